//! Running a loaded XDP program through `BPF_PROG_TEST_RUN`, for the golden-packet tests and
//! the datapath and packet benches: one frame with its output, repeated runs for timing, and
//! live frames (the kernel carries out the returned action). Also one frame through a tc
//! program ([`TcRunner`]).
//!
//! Every run gives the program an `xdp_md` context whose `ingress_ifindex` is the runner's
//! interface: `bpf_fib_lookup` and redirects then behave as for a frame received there (in
//! the namespace the calling thread is in).

use std::time::Duration;

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    programs::{SchedClassifier, TestRun as _, TestRunAttrs, TestRunOptions, Xdp},
};
use weir::datapath::XdpMd;

/// Room for what a program may add in front of a frame (an outer IPv6 header and a VLAN tag
/// need 44 bytes).
const HEADROOM: usize = 256;

/// One XDP program of a loaded object, run on frames arriving on one interface.
pub struct XdpRunner<'a> {
    program: &'a Xdp,
    ingress_ifindex: u32,
}

impl<'a> XdpRunner<'a> {
    /// Program `name` of `ebpf` (loaded into the kernel), frames arriving on interface
    /// `ingress_ifindex`.
    pub fn new(ebpf: &'a Ebpf, name: &str, ingress_ifindex: u32) -> Result<Self> {
        let program: &Xdp = ebpf
            .program(name)
            .with_context(|| format!("no program {name} in the object"))?
            .try_into()
            .with_context(|| format!("{name} is not an XDP program"))?;
        Ok(Self {
            program,
            ingress_ifindex,
        })
    }

    /// The context for a frame of `len` bytes: the kernel requires `data_end` to equal the
    /// input's length.
    fn context(&self, len: usize) -> Result<[u8; 24]> {
        Ok(XdpMd {
            data_end: u32::try_from(len).context("frame length")?,
            ingress_ifindex: self.ingress_ifindex,
            ..XdpMd::default()
        }
        .as_bytes())
    }

    /// One run on `input`: the XDP action and the frame as the program left it.
    pub fn run(&self, input: &[u8]) -> Result<(u32, Vec<u8>)> {
        let ctx = self.context(input.len())?;
        let mut out = vec![0u8; input.len() + HEADROOM];
        let result = self
            .program
            .test_run(TestRunOptions {
                data_in: Some(input),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..TestRunOptions::default()
            })
            .context("BPF_PROG_TEST_RUN")?;
        out.truncate(usize::try_from(result.data_size_out).context("output length")?);
        Ok((result.return_value, out))
    }

    /// `repeat` runs on `input` back to back, no output copied (the kernel does not restore
    /// the frame between runs): the action of the last and the kernel's mean time per run.
    pub fn time(&self, input: &[u8], repeat: u32) -> Result<(u32, Duration)> {
        let ctx = self.context(input.len())?;
        let result = self
            .program
            .test_run(TestRunOptions {
                data_in: Some(input),
                ctx_in: Some(&ctx),
                repeat,
                ..TestRunOptions::default()
            })
            .context("BPF_PROG_TEST_RUN")?;
        Ok((result.return_value, result.duration))
    }

    /// `repeat` runs with live frames (`BPF_F_TEST_XDP_LIVE_FRAMES`, `batch` frames per
    /// batch): the kernel carries out each returned action, as if `frame` had been received
    /// on the interface (frame pages are reused without being restored). Returns the kernel's
    /// mean time per frame, in whole nanoseconds.
    pub fn live_frames(&self, frame: &[u8], repeat: u32, batch: u32) -> Result<Duration> {
        let ctx = self.context(frame.len())?;
        let result = self
            .program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ctx_in: Some(&ctx),
                repeat,
                attrs: TestRunAttrs::new().xdp_live_frames(batch),
                ..TestRunOptions::default()
            })
            .context("BPF_PROG_TEST_RUN with live frames")?;
        Ok(result.duration)
    }
}

/// One tc (`SchedClassifier`) program of a loaded object. It gets no context: the kernel
/// builds an skb from the frame (on the loopback device of the calling thread's namespace,
/// checksum state `CHECKSUM_NONE`, so a checksum helper rewrites the field itself).
pub struct TcRunner<'a> {
    program: &'a SchedClassifier,
}

impl<'a> TcRunner<'a> {
    /// Program `name` of `ebpf` (loaded into the kernel).
    pub fn new(ebpf: &'a Ebpf, name: &str) -> Result<Self> {
        let program: &SchedClassifier = ebpf
            .program(name)
            .with_context(|| format!("no program {name} in the object"))?
            .try_into()
            .with_context(|| format!("{name} is not a tc program"))?;
        Ok(Self { program })
    }

    /// One run on `input`: the program's verdict and the frame as it left it.
    pub fn run(&self, input: &[u8]) -> Result<(i32, Vec<u8>)> {
        let mut out = vec![0u8; input.len() + HEADROOM];
        let result = self
            .program
            .test_run(TestRunOptions {
                data_in: Some(input),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .context("BPF_PROG_TEST_RUN")?;
        out.truncate(usize::try_from(result.data_size_out).context("output length")?);
        Ok((result.return_value.cast_signed(), out))
    }
}
