// SPDX-License-Identifier: GPL-2.0-only
//
// Katran's XDP balancer behind the same template restoration as Weir's `weir_bench`, for
// `cargo xtask bench datapath --katran PATH`. This file is ours; it holds none of Katran's
// code: it includes Katran's `balancer.bpf.c` from the checkout given at run time (GPL-2.0,
// which is why the object built from it, and so this file, are GPL-2.0: nothing of it is
// linked into Weir). Built by lb-userspace/benches/datapath.rs with
// `clang-19 -O2 -g -target bpf -I <checkout>`, Katran's default compile-time switches (none
// given: IPIP encapsulation, no inline decapsulation, no ICMP too-big generation, no
// source routing, no global LRU, no server-id routing).

#include "katran/lib/bpf/balancer.bpf.c"

// BPF_FUNC_xdp_store_bytes (Linux 5.18), which Katran's helper header predates.
static long (*weir_xdp_store_bytes)(
    struct xdp_md* xdp_md,
    __u32 offset,
    void* buf,
    __u32 len) = (void*)190;

// The size of Weir's `BenchTemplate` (lb-common `BENCH_TEMPLATE_LEN`): the frame's length
// and its first bytes.
#define WEIR_TEMPLATE_LEN 128

struct weir_bench_template {
  __u32 len;
  __u8 data[WEIR_TEMPLATE_LEN];
};

struct {
  __uint(type, BPF_MAP_TYPE_ARRAY);
  __type(key, __u32);
  __type(value, struct weir_bench_template);
  __uint(max_entries, 1);
} BENCH_TEMPLATE SEC(".maps");

// `bench packets`' generator settings, as Weir's `weir_bench_gen` reads them (lb-ebpf
// `BENCH_GEN`, `BENCH_GEN_SEQ`): [0] unused here (Katran balances every frame), [1] the number
// of flows, [2] the offset of the 16-bit field that tells them apart, [3] its first value;
// and this CPU's position in the flows.
struct {
  __uint(type, BPF_MAP_TYPE_ARRAY);
  __type(key, __u32);
  __type(value, __u32);
  __uint(max_entries, 9);
} BENCH_GEN SEC(".maps");

struct {
  __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
  __type(key, __u32);
  __type(value, __u32);
  __uint(max_entries, 1);
} BENCH_GEN_SEQ SEC(".maps");

// Weir's `restore_template`: trim what the previous run prepended, copy the template back.
static __attribute__((__always_inline__)) inline int weir_restore_template(
    struct xdp_md* ctx) {
  __u32 zero = 0;
  struct weir_bench_template* t =
      bpf_map_lookup_elem(&BENCH_TEMPLATE, &zero);
  if (!t) {
    return -1;
  }
  __u32 want = t->len;
  __u32 have = (__u32)(ctx->data_end - ctx->data);
  if (have > want) {
    if (bpf_xdp_adjust_head(ctx, (int)(have - want))) {
      return -1;
    }
  }
  __u32 len = want < WEIR_TEMPLATE_LEN ? want : WEIR_TEMPLATE_LEN;
  if (len == 0) {
    return -1;
  }
  if (weir_xdp_store_bytes(ctx, 0, t->data, len)) {
    return -1;
  }
  return 0;
}

// One run per repeat would otherwise count toward Katran's new-connection rate
// (MAX_CONN_RATE a second per CPU): past it, Katran stops inserting into its LRU, and the SYN
// row would price the flood mode instead of the new-flow path (Weir's rows run with its flood
// mode off). The counter is zeroed before every run, for every case alike, so the template
// copy row holds this store too.
static __attribute__((__always_inline__)) inline void weir_reset_conn_rate(void) {
  __u32 key = MAX_VIPS + NEW_CONN_RATE_CNTR;
  struct lb_stats* rate = bpf_map_lookup_elem(&stats, &key);
  if (rate) {
    rate->v1 = 0;
  }
}

// `flatten`: Katran's entry point `balancer_ingress` (and all it calls) is inlined here, so
// that no BPF-to-BPF call is added to Katran's cost.
SEC("xdp")
__attribute__((flatten)) int katran_bench(struct xdp_md* ctx) {
  if (weir_restore_template(ctx)) {
    return XDP_ABORTED;
  }
  weir_reset_conn_rate();
  return balancer_ingress(ctx);
}

// `bench packets`: Weir's `weir_bench_gen` in front of Katran, run with live frames on the
// LB's interface. The template restored, the next flow's value written into it, then
// Katran's `balancer_ingress`, inlined, whose XDP_TX really transmits. Katran's new-connection
// rate is left alone here: the flows are in its LRU after the warm-up, so no frame is new.
SEC("xdp")
__attribute__((flatten)) int katran_gen(struct xdp_md* ctx) {
  __u32 k1 = 1, k2 = 2, k3 = 3, zero = 0;
  __u32* flows = bpf_map_lookup_elem(&BENCH_GEN, &k1);
  __u32* offset = bpf_map_lookup_elem(&BENCH_GEN, &k2);
  __u32* base = bpf_map_lookup_elem(&BENCH_GEN, &k3);
  __u32* seq = bpf_map_lookup_elem(&BENCH_GEN_SEQ, &zero);
  if (!flows || !offset || !base || !seq) {
    return XDP_ABORTED;
  }
  if (weir_restore_template(ctx)) {
    return XDP_ABORTED;
  }
  __u32 n = *seq;
  *seq = n + 1 >= *flows ? 0 : n + 1;
  __u16 field = bpf_htons((__u16)(*base + n));
  if (weir_xdp_store_bytes(ctx, *offset, &field, 2)) {
    return XDP_ABORTED;
  }
  return balancer_ingress(ctx);
}
