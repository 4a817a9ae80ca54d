//! Running the client commands against the agent: building the API request of a command,
//! sending it, checking the answer, handing it to [`super::render`], and mapping the
//! failures (no agent, a refusal, a bad answer) to an `error: ...` line and an exit code.

use std::io::{self, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::render::{
    TableSummary, change_line, check_service_table, fleet_compare, reload_line, render_announce,
    render_backends, render_conns, render_fleet, render_json, render_json_line, render_services,
    render_stats, render_stats_with_rates, render_status, render_table_slots, render_table_summary,
    render_watch_header,
};
use super::{
    AnnounceArgs, AnnounceCommand, BackendArgs, BackendCommand, BackendTarget, ClientCommand,
    ConnArgs, ConnCommand, ConnFilterArgs, EX_CONFIG, EX_DATAERR, EX_NOPERM, EX_NOUSER,
    EX_UNAVAILABLE, EX_USAGE, EXIT_FAILURE, EXIT_OK, FleetArgs, FleetCommand, OutputFormat,
    ServiceArgs, ServiceCommand,
};
use crate::api::{
    self, AnnounceStatus, ApiError, BackendInfo, ClientError, ConnFlushed, ConnList, ErrorCode,
    ReloadReport, Reply, Request, ServiceInfo, ServiceTable, Stats, Status,
};

impl ClientCommand {
    /// The service the command names, for hints in error messages.
    fn service(&self) -> Option<&str> {
        match self {
            Self::Service(ServiceArgs {
                command: ServiceCommand::Table { service, .. },
                ..
            })
            | Self::Backend(BackendArgs {
                command:
                    BackendCommand::List {
                        service: Some(service),
                    },
                ..
            }) => Some(service),
            Self::Backend(BackendArgs { command, .. }) => {
                command.target().map(|t| t.service.as_str())
            }
            Self::Conn(ConnArgs { command, .. }) => command.filter().service.as_deref(),
            _ => None,
        }
    }
}

impl BackendCommand {
    /// The API request that performs this command.
    pub fn request(&self) -> Request {
        let parts = |t: &BackendTarget| (t.service.clone(), t.address);
        match self {
            Self::List { service } => Request::BackendList {
                service: service.clone(),
            },
            Self::Add { target, weight } => {
                let (service, address) = parts(target);
                Request::BackendAdd {
                    service,
                    address,
                    weight: *weight,
                }
            }
            Self::Remove(target) => {
                let (service, address) = parts(target);
                Request::BackendRemove { service, address }
            }
            Self::Weight { target, weight } => {
                let (service, address) = parts(target);
                Request::BackendWeight {
                    service,
                    address,
                    weight: *weight,
                }
            }
            Self::MaxConns {
                target,
                max_connections,
            } => {
                let (service, address) = parts(target);
                Request::BackendMaxConns {
                    service,
                    address,
                    max_connections: *max_connections,
                }
            }
            Self::Drain(target) => {
                let (service, address) = parts(target);
                Request::BackendDrain { service, address }
            }
            Self::Enable(target) => {
                let (service, address) = parts(target);
                Request::BackendEnable { service, address }
            }
            Self::Disable(target) => {
                let (service, address) = parts(target);
                Request::BackendDisable { service, address }
            }
        }
    }
}

impl ConnFilterArgs {
    /// `of service web, backend 198.51.100.11`, for the lines that say what was flushed.
    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(service) = &self.service {
            parts.push(format!("service {service}"));
        }
        if let Some(backend) = &self.backend {
            parts.push(format!("backend {backend}"));
        }
        if parts.is_empty() {
            "of every service".to_owned()
        } else {
            format!("of {}", parts.join(", "))
        }
    }

    /// The filter as `weir conn flush` options, to repeat in a hint.
    fn options(&self, all: bool) -> String {
        let mut text = String::new();
        if all {
            text.push_str(" --all");
        }
        if let Some(service) = &self.service {
            text.push_str(&format!(" --service {service}"));
        }
        if let Some(backend) = &self.backend {
            text.push_str(&format!(" --backend {backend}"));
        }
        text
    }
}

impl ConnCommand {
    pub const fn filter(&self) -> &ConnFilterArgs {
        match self {
            Self::List { filter, .. } | Self::Flush { filter, .. } => filter,
        }
    }

    /// The API request that performs this command (`weir conn flush` without `--yes` sends
    /// a `conn_list` instead, to say how many would go).
    pub fn request(&self) -> Request {
        match self {
            Self::List {
                filter,
                state,
                limit,
            } => Request::ConnList {
                service: filter.service.clone(),
                backend: filter.backend,
                state: *state,
                limit: Some(*limit),
            },
            Self::Flush { filter, all, yes } => Request::ConnFlush {
                service: filter.service.clone(),
                backend: filter.backend,
                all: *all,
                confirm: *yes,
            },
        }
    }
}

/// The exit status for an error the agent answered with.
pub fn api_exit_code(code: ErrorCode) -> u8 {
    match code {
        ErrorCode::InvalidAddress => EX_DATAERR,
        ErrorCode::UnknownService | ErrorCode::UnknownBackend => EX_NOUSER,
        ErrorCode::InvalidConfig => EX_CONFIG,
        ErrorCode::Unauthorized | ErrorCode::Forbidden => EX_NOPERM,
        ErrorCode::BadRequest | ErrorCode::Conflict | ErrorCode::Internal => EXIT_FAILURE,
    }
}

/// The exit status for a failure to get an answer from the agent.
pub fn client_exit_code(err: &ClientError) -> u8 {
    match err {
        ClientError::NotRunning(_) | ClientError::RemoteUnreachable(_) => EX_UNAVAILABLE,
        ClientError::PermissionDenied(_) => EX_NOPERM,
        ClientError::Io { .. } | ClientError::BadResponse(_) | ClientError::Remote(_) => {
            EXIT_FAILURE
        }
    }
}

/// Where a client command writes: its results to `out`, its errors to `err`. `terminal`
/// says whether `out` is a terminal (`weir stats --watch` then redraws the screen).
pub struct Streams<'a> {
    pub out: &'a mut dyn Write,
    pub err: &'a mut dyn Write,
    pub terminal: bool,
}

/// Runs a client command against the agent and returns its exit status. Results go to
/// `streams.out`; an error goes to `streams.err` as one `error: ...` line that says what
/// to do. `weir stats --watch` returns only on an error.
pub fn run_client(command: &ClientCommand, streams: &mut Streams<'_>) -> u8 {
    run_client_frames(command, streams, None)
}

/// [`run_client`], with `weir stats --watch` stopping after `frames` snapshots if given.
fn run_client_frames(
    command: &ClientCommand,
    streams: &mut Streams<'_>,
    frames: Option<u64>,
) -> u8 {
    let remote = match command.opts().remote() {
        Ok(remote) => remote,
        Err(message) => {
            let _ = writeln!(streams.err, "error: {message}");
            return EX_USAGE;
        }
    };
    let mut client = Client {
        socket: command.opts().socket_path(),
        remote,
        output: command.opts().output,
        out: &mut *streams.out,
        terminal: streams.terminal,
    };
    let result = client
        .run(command, frames)
        .and_then(|()| streams.out.flush().map_err(Failure::Output));
    match result {
        Ok(()) => EXIT_OK,
        // The reader went away (`weir service table web | head`): not worth a word.
        Err(Failure::Output(err)) if err.kind() == io::ErrorKind::BrokenPipe => EXIT_OK,
        Err(failure) => {
            // Whatever was printed goes out before the error, in order.
            let _ = streams.out.flush();
            let _ = writeln!(streams.err, "error: {}", failure.message(command));
            let _ = streams.err.flush();
            failure.exit_code()
        }
    }
}

/// Why a client command failed.
#[derive(Debug)]
enum Failure {
    /// No answer from the agent (or one that makes no sense).
    Client(ClientError),
    /// The agent refused.
    Api(ApiError),
    /// Writing the results failed.
    Output(io::Error),
    /// The CLI itself refused (the message says what to do).
    Refused(String),
}

impl From<io::Error> for Failure {
    fn from(err: io::Error) -> Self {
        Self::Output(err)
    }
}

impl Failure {
    fn bad_response(what: impl std::fmt::Display) -> Self {
        Self::Client(ClientError::BadResponse(what.to_string()))
    }

    fn exit_code(&self) -> u8 {
        match self {
            Self::Client(err) => client_exit_code(err),
            Self::Api(err) => api_exit_code(err.code),
            Self::Output(_) | Self::Refused(_) => EXIT_FAILURE,
        }
    }

    /// The error line after `error: `.
    fn message(&self, command: &ClientCommand) -> String {
        match self {
            Self::Client(err) => err.to_string(),
            Self::Output(err) => format!("writing the output: {err}"),
            Self::Refused(message) => message.clone(),
            Self::Api(ApiError { code, message }) => {
                let hint = match code {
                    ErrorCode::UnknownService => Some("see `weir service list`".to_owned()),
                    ErrorCode::UnknownBackend => Some(match command.service() {
                        Some(service) => format!("see `weir backend list {service}`"),
                        None => "see `weir backend list`".to_owned(),
                    }),
                    ErrorCode::InvalidConfig => Some(
                        "the agent keeps its running config; fix the file, check it with \
                         `weir config check FILE`, then run `weir reload` again"
                            .to_owned(),
                    ),
                    ErrorCode::BadRequest => Some(
                        "the agent did not understand the request; is it the same version \
                         as this CLI? (see `weir status`)"
                            .to_owned(),
                    ),
                    ErrorCode::Internal => Some("see the agent's log".to_owned()),
                    ErrorCode::Unauthorized => Some(
                        "check --token-file: the token must be one whose SHA-256 is in the \
                         agent's [[api.token]]"
                            .to_owned(),
                    ),
                    ErrorCode::Forbidden => {
                        Some("this needs a token with scope = \"admin\"".to_owned())
                    }
                    ErrorCode::InvalidAddress | ErrorCode::Conflict => None,
                };
                match hint {
                    // The agent's message may already say what to do.
                    Some(hint) if !message.contains("`weir ") => format!("{message} ({hint})"),
                    _ => message.clone(),
                }
            }
        }
    }
}

struct Client<'a> {
    socket: PathBuf,
    /// `--server`: the remote agent, used instead of `socket`.
    remote: Option<api::RemoteTarget>,
    output: OutputFormat,
    out: &'a mut dyn Write,
    terminal: bool,
}

impl Client<'_> {
    /// Sends `request` and returns the `data` of a successful answer.
    fn call(&self, request: &Request) -> Result<Reply, Failure> {
        let response = match &self.remote {
            Some(remote) => api::request_remote(remote, request),
            None => api::request(&self.socket, request),
        }
        .map_err(Failure::Client)?;
        match (response.ok, response.error, response.data) {
            (true, _, Some(reply)) => Ok(reply),
            (true, _, None) => Err(Failure::bad_response("ok, but no data")),
            (false, Some(error), _) => Err(Failure::Api(error)),
            (false, None, _) => Err(Failure::bad_response("not ok, but no error given")),
        }
    }

    /// [`Self::call`], for the payload a request of this kind is answered with.
    fn fetch<T: TryFrom<Reply, Error = Reply>>(&self, request: &Request) -> Result<T, Failure> {
        T::try_from(self.call(request)?)
            .map_err(|other| Failure::bad_response(format!("unexpected answer {other:?}")))
    }

    /// Prints `payload` with `-o json`, or hands it to `table` otherwise.
    fn show<T: Serialize>(
        &mut self,
        payload: &T,
        table: impl FnOnce(&T, &mut dyn Write) -> io::Result<()>,
    ) -> Result<(), Failure> {
        match self.output {
            OutputFormat::Json => render_json(payload, self.out)?,
            OutputFormat::Table => table(payload, self.out)?,
        }
        Ok(())
    }

    fn run(&mut self, command: &ClientCommand, frames: Option<u64>) -> Result<(), Failure> {
        match command {
            ClientCommand::Status(_) => {
                let status: Status = self.fetch(&Request::Status {})?;
                self.show(&status, |status, out| {
                    render_status(status, unix_now(), out)
                })?;
            }
            ClientCommand::Service(ServiceArgs {
                command: ServiceCommand::List,
                ..
            }) => {
                let services: Vec<ServiceInfo> = self.fetch(&Request::ServiceList {})?;
                self.show(&services, |services, out| render_services(services, out))?;
            }
            ClientCommand::Service(ServiceArgs {
                command: ServiceCommand::Table { service, summary },
                ..
            }) => {
                let table: ServiceTable = self.fetch(&Request::ServiceTable {
                    service: service.clone(),
                })?;
                if self.output == OutputFormat::Json {
                    if *summary {
                        render_json(&TableSummary::of(&table), self.out)?;
                    } else {
                        render_json(&table, self.out)?;
                    }
                    return Ok(());
                }
                check_service_table(&table).map_err(Failure::bad_response)?;
                render_table_summary(&table, self.out)?;
                if !summary {
                    writeln!(self.out)?;
                    render_table_slots(&table, self.out)?;
                }
            }
            ClientCommand::Backend(BackendArgs { command, .. }) => self.backend(command)?,
            ClientCommand::Stats(args) => {
                if args.watch {
                    self.stats_watch(args.interval, frames)?;
                } else {
                    let stats: Stats = self.fetch(&Request::Stats {})?;
                    self.show(&stats, |stats, out| render_stats(stats, out))?;
                }
            }
            ClientCommand::Reload(_) => {
                let report: ReloadReport = self.fetch(&Request::Reload {})?;
                self.show(&report, |report, out| {
                    writeln!(out, "{}", reload_line(report))
                })?;
            }
            ClientCommand::Conn(ConnArgs { command, .. }) => self.conn(command)?,
            ClientCommand::Announce(AnnounceArgs { command, .. }) => {
                let request = match command {
                    AnnounceCommand::Withdraw => Request::AnnounceWithdraw {},
                    AnnounceCommand::Resume => Request::AnnounceResume {},
                };
                let status: AnnounceStatus = self.fetch(&request)?;
                self.show(&status, |status, out| {
                    render_announce(status, unix_now(), out)
                })?;
            }
            ClientCommand::Fleet(FleetArgs {
                command: FleetCommand::Check { sockets },
                ..
            }) => self.fleet_check(sockets)?,
        }
        Ok(())
    }

    /// `weir fleet check`: every agent's service list, compared by name. An agent that
    /// does not answer fails the whole check (its socket named).
    fn fleet_check(&mut self, sockets: &[PathBuf]) -> Result<(), Failure> {
        let mut agents = Vec::new();
        for socket in sockets {
            let asked = Client {
                socket: socket.clone(),
                remote: None,
                output: self.output,
                out: &mut io::sink(),
                terminal: false,
            };
            let services: Vec<ServiceInfo> = asked.fetch(&Request::ServiceList {})?;
            agents.push((socket.display().to_string(), services));
        }
        let fleet = fleet_compare(&agents);
        self.show(&fleet, |fleet, out| render_fleet(fleet, out))?;
        let differ: Vec<&str> = fleet
            .iter()
            .filter(|s| !s.equal)
            .map(|s| s.service.as_str())
            .collect();
        if differ.is_empty() {
            Ok(())
        } else {
            Err(Failure::Refused(format!(
                "the rings of {} differ between these {} agents: a flow that moves between \
                 them may reach another backend (compare `weir backend list` on each)",
                differ.join(", "),
                sockets.len()
            )))
        }
    }

    fn conn(&mut self, command: &ConnCommand) -> Result<(), Failure> {
        let ConnCommand::Flush { filter, all, yes } = command else {
            let list: ConnList = self.fetch(&command.request())?;
            return self.show(&list, |list, out| render_conns(list, out));
        };
        if filter.service.is_none() && filter.backend.is_none() && !all {
            return Err(Failure::Refused(
                "`weir conn flush` needs --service NAME, --backend ADDR, or --all for every \
                 NAT connection; nothing flushed"
                    .to_owned(),
            ));
        }
        if !yes {
            // Say how many would go (the total of a list of one), and flush nothing.
            let would: ConnList = self.fetch(&Request::ConnList {
                service: filter.service.clone(),
                backend: filter.backend,
                state: None,
                limit: Some(1),
            })?;
            return Err(Failure::Refused(format!(
                "{} NAT connection{} {} would be flushed; nothing flushed without --yes \
                 (`weir conn flush{} --yes`)",
                would.total,
                if would.total == 1 { "" } else { "s" },
                filter.describe(),
                filter.options(*all)
            )));
        }
        let flushed: ConnFlushed = self.fetch(&command.request())?;
        self.show(&flushed, |flushed, out| {
            writeln!(
                out,
                "flushed {} NAT connection{} {} ({} table entries)",
                flushed.connections,
                if flushed.connections == 1 { "" } else { "s" },
                filter.describe(),
                flushed.entries
            )
        })
    }

    fn backend(&mut self, command: &BackendCommand) -> Result<(), Failure> {
        let request = command.request();
        if let BackendCommand::List { .. } = command {
            let backends: Vec<BackendInfo> = self.fetch(&request)?;
            return self.show(&backends, |backends, out| render_backends(backends, out));
        }
        // Changes report the state before and after; the answer holds only the after.
        let before = match command {
            BackendCommand::Weight { target, .. }
            | BackendCommand::MaxConns { target, .. }
            | BackendCommand::Drain(target)
            | BackendCommand::Enable(target)
            | BackendCommand::Disable(target)
                if self.output == OutputFormat::Table =>
            {
                self.lookup(target)
            }
            _ => None,
        };
        let reply = self.call(&request)?;
        self.show(&reply, |reply, out| {
            // A removed backend has no state after the change.
            let after = match reply {
                Reply::Backend(after) => Some(after),
                _ => None,
            };
            writeln!(out, "{}", change_line(command, before.as_ref(), after))
        })
    }

    /// The current state of a backend, if the agent tells (errors surface in the change).
    fn lookup(&self, target: &BackendTarget) -> Option<BackendInfo> {
        let backends: Vec<BackendInfo> = self
            .fetch(&Request::BackendList {
                service: Some(target.service.clone()),
            })
            .ok()?;
        backends
            .into_iter()
            .find(|b| b.service == target.service && b.address == target.address)
    }

    fn stats_watch(&mut self, interval: Duration, frames: Option<u64>) -> Result<(), Failure> {
        let mut previous: Option<(Stats, Instant)> = None;
        let mut next = Instant::now();
        let mut shown = 0_u64;
        loop {
            let stats: Stats = self.fetch(&Request::Stats {})?;
            let taken = Instant::now();
            if self.output == OutputFormat::Json {
                render_json_line(&stats, self.out)?;
            } else {
                if self.terminal {
                    // Cursor home, clear the screen.
                    write!(self.out, "\x1b[H\x1b[2J")?;
                } else if shown > 0 {
                    writeln!(self.out)?;
                }
                render_watch_header(interval, unix_now(), self.out)?;
                let rates = previous
                    .as_ref()
                    .map(|(stats, at)| (stats, taken.duration_since(*at).as_secs_f64()));
                render_stats_with_rates(&stats, rates, self.out)?;
                previous = Some((stats, taken));
            }
            self.out.flush()?;
            shown += 1;
            if frames.is_some_and(|frames| shown >= frames) {
                return Ok(());
            }
            next += interval;
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            } else {
                // Fell behind (a slow agent): start counting again from now.
                next = now;
            }
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::super::EX_USAGE;
    use super::super::fixtures::{
        backend, backend_info, client, ip, sample_ring, sample_stats, sample_status,
    };
    use super::*;
    use crate::api::{Admin, Removed, Response};
    use std::io::{BufRead as _, BufReader};
    use std::os::unix::net::UnixListener;
    use std::path::Path;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::thread::JoinHandle;

    #[test]
    fn backend_args() {
        let service = "web".to_owned();
        let address = ip("198.51.100.11");
        assert_eq!(
            backend(&["backend", "list"]).request(),
            Request::BackendList { service: None }
        );
        assert_eq!(
            backend(&["backend", "list", "web"]).request(),
            Request::BackendList {
                service: Some(service.clone())
            }
        );
        assert_eq!(
            backend(&["backend", "add", "web", "198.51.100.11"]).request(),
            Request::BackendAdd {
                service: service.clone(),
                address,
                weight: 1
            }
        );
        assert_eq!(
            backend(&["backend", "add", "web", "2001:db8::11", "--weight", "0"]).request(),
            Request::BackendAdd {
                service: service.clone(),
                address: ip("2001:db8::11"),
                weight: 0
            }
        );
        assert_eq!(
            backend(&["backend", "remove", "web", "198.51.100.11"]).request(),
            Request::BackendRemove {
                service: service.clone(),
                address
            }
        );
        assert_eq!(
            backend(&["backend", "weight", "web", "198.51.100.11", "65535"]).request(),
            Request::BackendWeight {
                service: service.clone(),
                address,
                weight: 65535
            }
        );
        assert_eq!(
            backend(&["backend", "drain", "web", "198.51.100.11"]).request(),
            Request::BackendDrain {
                service: service.clone(),
                address
            }
        );
        assert_eq!(
            backend(&["backend", "enable", "web", "198.51.100.11"]).request(),
            Request::BackendEnable {
                service: service.clone(),
                address
            }
        );
        assert_eq!(
            backend(&["backend", "disable", "web", "198.51.100.11"]).request(),
            Request::BackendDisable { service, address }
        );
        let command = client(&["backend", "--socket", "/x.sock", "drain", "web", "::1"]);
        assert_eq!(command.opts().socket.as_deref(), Some(Path::new("/x.sock")));
        assert_eq!(command.service(), Some("web"));
    }

    // ----- exit codes -----
    #[test]
    fn api_error_exit_codes() {
        for (code, exit) in [
            (ErrorCode::BadRequest, EXIT_FAILURE),
            (ErrorCode::UnknownService, EX_NOUSER),
            (ErrorCode::UnknownBackend, EX_NOUSER),
            (ErrorCode::InvalidAddress, EX_DATAERR),
            (ErrorCode::Conflict, EXIT_FAILURE),
            (ErrorCode::InvalidConfig, EX_CONFIG),
            (ErrorCode::Internal, EXIT_FAILURE),
        ] {
            assert_eq!(api_exit_code(code), exit, "{code:?}");
        }
        assert_eq!(
            [
                EX_USAGE,
                EX_DATAERR,
                EX_NOUSER,
                EX_UNAVAILABLE,
                EX_NOPERM,
                EX_CONFIG
            ],
            [64, 65, 67, 69, 77, 78]
        );
    }

    #[test]
    fn client_error_exit_codes() {
        let path = "/run/weir/weir.sock".to_owned();
        for (err, exit) in [
            (ClientError::NotRunning(path.clone()), EX_UNAVAILABLE),
            (ClientError::PermissionDenied(path.clone()), EX_NOPERM),
            (
                ClientError::Io {
                    path,
                    source: io::Error::other("reset"),
                },
                EXIT_FAILURE,
            ),
            (ClientError::BadResponse("{".into()), EXIT_FAILURE),
        ] {
            assert_eq!(client_exit_code(&err), exit, "{err:?}");
        }
    }

    // ----- against a fake agent -----

    /// A directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let path = std::env::temp_dir().join(format!(
                "weir-cli-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&path).unwrap();
            Self(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// An agent that answers `answers.len()` connections in order and returns what it was
    /// asked.
    struct FakeAgent {
        dir: TempDir,
        thread: JoinHandle<Vec<Request>>,
    }

    impl FakeAgent {
        fn start(answers: Vec<Response>) -> Self {
            Self::start_raw(
                answers
                    .iter()
                    .map(|answer| serde_json::to_string(answer).unwrap())
                    .collect(),
            )
        }

        /// Answers with these lines as they are (a newline is added).
        fn start_raw(answers: Vec<String>) -> Self {
            let dir = TempDir::new();
            let listener = UnixListener::bind(dir.0.join("weir.sock")).unwrap();
            let thread = std::thread::spawn(move || {
                let mut requests = Vec::new();
                for answer in answers {
                    let (stream, _) = listener.accept().unwrap();
                    let mut line = String::new();
                    BufReader::new(&stream).read_line(&mut line).unwrap();
                    requests.push(serde_json::from_str(&line).unwrap());
                    let mut text = answer;
                    text.push('\n');
                    (&stream).write_all(text.as_bytes()).unwrap();
                }
                requests
            });
            Self { dir, thread }
        }

        fn socket(&self) -> String {
            self.dir.0.join("weir.sock").display().to_string()
        }

        fn requests(self) -> Vec<Request> {
            self.thread.join().unwrap()
        }
    }

    struct Run {
        code: u8,
        out: String,
        err: String,
    }

    fn run_with(args: &[&str], terminal: bool, frames: Option<u64>) -> Run {
        let command = client(args);
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = run_client_frames(
            &command,
            &mut Streams {
                out: &mut out,
                err: &mut err,
                terminal,
            },
            frames,
        );
        Run {
            code,
            out: String::from_utf8(out).unwrap(),
            err: String::from_utf8(err).unwrap(),
        }
    }

    fn run(args: &[&str]) -> Run {
        run_with(args, false, None)
    }

    #[test]
    fn weight_change_against_a_fake_agent() {
        let before = backend_info("web", "198.51.100.11", 1, Admin::Enabled);
        let other = backend_info("web", "198.51.100.12", 7, Admin::Enabled);
        let after = backend_info("web", "198.51.100.11", 3, Admin::Enabled);
        let agent = FakeAgent::start(vec![Response::ok(vec![other, before]), Response::ok(after)]);
        let socket = agent.socket();
        let run = run(&[
            "backend",
            "weight",
            "web",
            "198.51.100.11",
            "3",
            "--socket",
            &socket,
        ]);
        assert_eq!((run.code, run.err.as_str()), (EXIT_OK, ""));
        assert_eq!(run.out, "web 198.51.100.11: weight 1 -> 3\n");
        assert_eq!(
            agent.requests(),
            [
                Request::BackendList {
                    service: Some("web".into())
                },
                Request::BackendWeight {
                    service: "web".into(),
                    address: ip("198.51.100.11"),
                    weight: 3
                }
            ]
        );
    }

    fn web_service(fingerprint: &str) -> ServiceInfo {
        use crate::api::{Forwarding, HealthCheckKind, Protocol, Scheduler};
        ServiceInfo {
            name: "web".into(),
            vip: ip("203.0.113.10"),
            port: 80,
            protocol: Protocol::Tcp,
            scheduler: Scheduler::Maglev,
            forwarding: Forwarding::Tunnel,
            ring_size: 65537,
            health_check: HealthCheckKind::Tcp,
            backends: 3,
            backends_up: 3,
            fingerprint: fingerprint.into(),
            rate_limit: api::RateLimitInfo::default(),
        }
    }

    #[test]
    fn announce_withdraw_and_resume_against_a_fake_agent() {
        let withdrawn = AnnounceStatus {
            device: "weir-vips".into(),
            table: 100,
            withdrawn: true,
            vips: vec![api::VipAnnouncement {
                vip: ip("203.0.113.10"),
                announced: false,
                since: unix_now(),
                reason: "withdrawn".into(),
            }],
        };
        let agent = FakeAgent::start(vec![
            Response::ok(withdrawn),
            Response::error(
                ErrorCode::Conflict,
                "this agent announces nothing: its config has no [announce] section",
            ),
        ]);
        let socket = agent.socket();
        let run_1 = run(&["announce", "withdraw", "--socket", &socket]);
        assert_eq!((run_1.code, run_1.err.as_str()), (EXIT_OK, ""));
        assert!(
            run_1.out.contains("WITHDRAWN by the operator"),
            "{}",
            run_1.out
        );
        assert!(
            run_1.out.contains("203.0.113.10  no         withdrawn"),
            "{}",
            run_1.out
        );
        let run_2 = run(&["announce", "resume", "--socket", &socket]);
        assert_eq!(run_2.code, EXIT_FAILURE);
        assert!(run_2.err.contains("no [announce] section"), "{}", run_2.err);
        assert_eq!(
            agent.requests(),
            [Request::AnnounceWithdraw {}, Request::AnnounceResume {}]
        );
    }

    #[test]
    fn fleet_check_names_the_services_whose_rings_differ() {
        let check = |prints: [&str; 2]| {
            let agents = prints.map(|p| FakeAgent::start(vec![Response::ok(vec![web_service(p)])]));
            let sockets = [agents[0].socket(), agents[1].socket()];
            let result = run(&["fleet", "check", &sockets[0], &sockets[1]]);
            for agent in agents {
                assert_eq!(agent.requests(), [Request::ServiceList {}]);
            }
            result
        };
        let same = check(["00000000000000aa", "00000000000000aa"]);
        assert_eq!((same.code, same.err.as_str()), (EXIT_OK, ""));
        assert!(
            same.out
                .contains("web      equal  00000000000000aa at all 2"),
            "{}",
            same.out
        );
        let differ = check(["00000000000000aa", "00000000000000bb"]);
        assert_eq!(differ.code, EXIT_FAILURE);
        assert!(differ.out.contains("DIFFERS"), "{}", differ.out);
        assert!(
            differ
                .err
                .contains("the rings of web differ between these 2 agents"),
            "{}",
            differ.err
        );
        // One agent is nothing to compare with; a missing agent fails the check.
        use clap::Parser as _;
        assert!(crate::cli::Cli::try_parse_from(["weir", "fleet", "check", "/a.sock"]).is_err());
        let gone = run(&[
            "fleet",
            "check",
            "/nonexistent/a.sock",
            "/nonexistent/b.sock",
        ]);
        assert_eq!(gone.code, EX_UNAVAILABLE, "{}", gone.err);
        assert!(gone.err.contains("/nonexistent/a.sock"), "{}", gone.err);
    }

    #[test]
    fn conn_args_make_their_requests() {
        let conn = |args: &[&str]| match client(args) {
            ClientCommand::Conn(ConnArgs { command, .. }) => command.request(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            conn(&["conn", "list"]),
            Request::ConnList {
                service: None,
                backend: None,
                state: None,
                limit: Some(1000)
            }
        );
        assert_eq!(
            conn(&[
                "conn",
                "list",
                "--service",
                "web",
                "--backend",
                "2001:db8::12",
                "--limit",
                "5"
            ]),
            Request::ConnList {
                service: Some("web".into()),
                backend: Some(ip("2001:db8::12")),
                state: None,
                limit: Some(5)
            }
        );
        assert_eq!(
            conn(&["conn", "list", "--state", "time-wait"]),
            Request::ConnList {
                service: None,
                backend: None,
                state: Some(api::ConnState::TimeWait),
                limit: Some(1000)
            }
        );
        assert_eq!(
            conn(&["conn", "flush", "--backend", "198.51.100.11", "--yes"]),
            Request::ConnFlush {
                service: None,
                backend: Some(ip("198.51.100.11")),
                all: false,
                confirm: true
            }
        );
        assert_eq!(
            conn(&["conn", "flush", "--all"]),
            Request::ConnFlush {
                service: None,
                backend: None,
                all: true,
                confirm: false
            }
        );
        for bad in [
            &["conn", "list", "--limit", "0"][..],
            &["conn", "list", "--limit", "100001"],
            &["conn", "list", "--state", "open"],
            &["conn", "flush", "--all", "--state", "close"],
            &["conn", "flush", "--all", "--service", "web"],
            &["conn", "list", "web"],
            &["conn"],
        ] {
            let err = super::super::fixtures::parse(bad).unwrap_err();
            assert_eq!(
                super::super::usage_exit_code(&err),
                EX_USAGE,
                "{bad:?}: {err}"
            );
        }
        let err =
            super::super::fixtures::parse(&["conn", "list", "--backend", "web2"]).unwrap_err();
        assert_eq!(super::super::usage_exit_code(&err), EX_DATAERR);
    }

    #[test]
    fn conn_list_and_flush_against_a_fake_agent() {
        let list = super::super::fixtures::sample_conns();
        let agent = FakeAgent::start(vec![
            Response::ok(list.clone()),
            Response::ok(list.clone()),
            Response::ok(ConnList {
                total: 3,
                truncated: true,
                connections: list.connections[..1].to_vec(),
            }),
            Response::ok(ConnFlushed {
                connections: 3,
                entries: 6,
            }),
        ]);
        let socket = agent.socket();
        let json = run(&["conn", "list", "-o", "json", "--socket", &socket]);
        assert_eq!((json.code, json.err.as_str()), (EXIT_OK, ""));
        assert_eq!(serde_json::from_str::<ConnList>(&json.out).unwrap(), list);
        let table = run(&["conn", "list", "--service", "web", "--socket", &socket]);
        assert_eq!(table.code, EXIT_OK);
        assert!(table.out.starts_with("PROTO  CLIENT"), "{}", table.out);
        assert!(
            table
                .out
                .ends_with("2 of 7 connections shown (--limit N shows more)\n")
        );
        // Without --yes: how many would go, exit 1, nothing flushed.
        let dry = run(&[
            "conn",
            "flush",
            "--backend",
            "198.51.100.11",
            "--socket",
            &socket,
        ]);
        assert_eq!((dry.code, dry.out.as_str()), (EXIT_FAILURE, ""));
        assert_eq!(
            dry.err,
            "error: 3 NAT connections of backend 198.51.100.11 would be flushed; nothing \
             flushed without --yes (`weir conn flush --backend 198.51.100.11 --yes`)\n"
        );
        let done = run(&[
            "conn",
            "flush",
            "--backend",
            "198.51.100.11",
            "--yes",
            "--socket",
            &socket,
        ]);
        assert_eq!((done.code, done.err.as_str()), (EXIT_OK, ""));
        assert_eq!(
            done.out,
            "flushed 3 NAT connections of backend 198.51.100.11 (6 table entries)\n"
        );
        let backend = Some(ip("198.51.100.11"));
        assert_eq!(
            agent.requests(),
            [
                Request::ConnList {
                    service: None,
                    backend: None,
                    state: None,
                    limit: Some(1000)
                },
                Request::ConnList {
                    service: Some("web".into()),
                    backend: None,
                    state: None,
                    limit: Some(1000)
                },
                Request::ConnList {
                    service: None,
                    backend,
                    state: None,
                    limit: Some(1)
                },
                Request::ConnFlush {
                    service: None,
                    backend,
                    all: false,
                    confirm: true
                },
            ]
        );
        // No filter: refused before asking the agent (no socket needed).
        let bare = run(&[
            "conn",
            "flush",
            "--yes",
            "--socket",
            "/nonexistent/weir.sock",
        ]);
        assert_eq!(bare.code, EXIT_FAILURE);
        assert!(
            bare.err
                .contains("needs --service NAME, --backend ADDR, or --all"),
            "{}",
            bare.err
        );
    }

    #[test]
    fn json_output_is_the_data() {
        let backends = vec![backend_info("web", "198.51.100.11", 1, Admin::Enabled)];
        let agent = FakeAgent::start(vec![Response::ok(backends.clone())]);
        let socket = agent.socket();
        let run = run(&["backend", "list", "web", "-o", "json", "--socket", &socket]);
        assert_eq!((run.code, run.err.as_str()), (EXIT_OK, ""));
        let printed: Vec<BackendInfo> = serde_json::from_str(&run.out).unwrap();
        assert_eq!(printed, backends);
        assert!(run.out.contains("\n  "), "pretty-printed: {}", run.out);
        assert_eq!(
            agent.requests(),
            [Request::BackendList {
                service: Some("web".into())
            }]
        );
    }

    #[test]
    fn removal_against_a_fake_agent() {
        let removed = || Response::ok(Removed::new("web".into(), ip("198.51.100.11")));
        let agent = FakeAgent::start(vec![removed(), removed()]);
        let socket = agent.socket();
        let args = [
            "backend",
            "remove",
            "web",
            "198.51.100.11",
            "--socket",
            &socket,
        ];
        let table = run(&args);
        assert_eq!((table.code, table.err.as_str()), (EXIT_OK, ""));
        assert_eq!(table.out, "web 198.51.100.11: removed\n");
        let json = run(&[&args[..], &["-o", "json"]].concat());
        assert_eq!((json.code, json.err.as_str()), (EXIT_OK, ""));
        let printed: serde_json::Value = serde_json::from_str(&json.out).unwrap();
        assert_eq!(
            printed,
            serde_json::json!({"service": "web", "address": "198.51.100.11", "removed": true})
        );
        agent.requests();
    }

    #[test]
    fn service_table_against_a_fake_agent() {
        let agent = FakeAgent::start(vec![
            Response::ok(sample_ring()),
            Response::ok(sample_ring()),
        ]);
        let socket = agent.socket();
        let full = run(&["service", "table", "web", "--socket", &socket]);
        assert_eq!((full.code, full.err.as_str()), (EXIT_OK, ""));
        assert!(full.out.starts_with("web: ring of 7 slots, 2 backends\n"));
        assert!(
            full.out
                .contains("\n\nSLOT  BACKEND\n   0  198.51.100.11\n")
        );
        assert_eq!(full.out.lines().count(), 1 + 4 + 1 + 1 + 7);
        let json = run(&[
            "service",
            "table",
            "web",
            "--summary",
            "-o",
            "json",
            "--socket",
            &socket,
        ]);
        assert_eq!(json.code, EXIT_OK);
        let value: serde_json::Value = serde_json::from_str(&json.out).unwrap();
        assert!(value.get("slots").is_none() && value.get("counts").is_some());
        agent.requests();
    }

    #[test]
    fn api_errors_against_a_fake_agent() {
        let cases = [
            (
                &["backend", "list", "foo"][..],
                Response::error(ErrorCode::UnknownService, "unknown service \"foo\""),
                EX_NOUSER,
                "error: unknown service \"foo\" (see `weir service list`)\n",
            ),
            (
                &["backend", "remove", "web", "198.51.100.99"],
                Response::error(
                    ErrorCode::UnknownBackend,
                    "service \"web\" has no backend 198.51.100.99",
                ),
                EX_NOUSER,
                "error: service \"web\" has no backend 198.51.100.99 \
                 (see `weir backend list web`)\n",
            ),
            (
                &["backend", "add", "web", "0.0.0.0"],
                Response::error(
                    ErrorCode::InvalidAddress,
                    "0.0.0.0 is not a unicast address",
                ),
                EX_DATAERR,
                "error: 0.0.0.0 is not a unicast address\n",
            ),
            (
                &["backend", "add", "web", "198.51.100.11"],
                Response::error(ErrorCode::Conflict, "web already has backend 198.51.100.11"),
                EXIT_FAILURE,
                "error: web already has backend 198.51.100.11\n",
            ),
            (
                &["reload"],
                Response::error(
                    ErrorCode::InvalidConfig,
                    "/etc/weir/weir.toml: service[0].ring_size: 65536 is not prime",
                ),
                EX_CONFIG,
                "error: /etc/weir/weir.toml: service[0].ring_size: 65536 is not prime \
                 (the agent keeps its running config; fix the file, check it with \
                 `weir config check FILE`, then run `weir reload` again)\n",
            ),
            (
                &["stats"],
                Response::error(ErrorCode::Internal, "reading STATS: EPERM"),
                EXIT_FAILURE,
                "error: reading STATS: EPERM (see the agent's log)\n",
            ),
        ];
        for (args, answer, code, err) in cases {
            let agent = FakeAgent::start(vec![answer]);
            let socket = agent.socket();
            let mut args = args.to_vec();
            args.extend(["--socket", &socket]);
            let run = run(&args);
            assert_eq!(
                (run.code, run.err.as_str(), run.out.as_str()),
                (code, err, ""),
                "{args:?}"
            );
            agent.requests();
        }
    }

    #[test]
    fn a_bad_answer_is_a_failure() {
        let agent = FakeAgent::start_raw(vec![r#"{"ok":true,"data":"not a status"}"#.into()]);
        let socket = agent.socket();
        let run = run(&["status", "--socket", &socket]);
        assert_eq!(run.code, EXIT_FAILURE);
        assert!(
            run.err
                .starts_with("error: the agent sent an answer that is not valid: "),
            "{}",
            run.err
        );
        agent.requests();
    }

    #[test]
    fn agent_not_running() {
        let dir = TempDir::new();
        let socket = dir.0.join("weir.sock").display().to_string();
        let run = run(&["status", "--socket", &socket]);
        assert_eq!(run.code, EX_UNAVAILABLE);
        assert_eq!(
            run.err,
            format!(
                "error: the agent is not running (no socket at {socket}); \
                 start it with `weir agent --config FILE`\n"
            )
        );
        assert_eq!(run.out, "");
    }

    #[test]
    fn status_and_reload_against_a_fake_agent() {
        let mut status = sample_status();
        status.last_reload = None;
        let agent = FakeAgent::start(vec![
            Response::ok(status),
            Response::ok(ReloadReport {
                services: 2,
                ring_slots_written: 12,
                backends_written: 1,
            }),
        ]);
        let socket = agent.socket();
        let first = run(&["status", "--socket", &socket]);
        assert_eq!(first.code, EXIT_OK, "{}", first.err);
        assert!(
            first
                .out
                .contains("last reload  none since the agent started\n")
        );
        let second = run(&["reload", "--socket", &socket]);
        assert_eq!(second.code, EXIT_OK, "{}", second.err);
        assert_eq!(
            second.out,
            "reloaded: 2 services; 12 ring slots and 1 backend rewritten\n"
        );
        assert_eq!(agent.requests(), [Request::Status {}, Request::Reload {}]);
    }

    #[test]
    fn stats_watch_shows_rates() {
        let agent = FakeAgent::start(vec![
            Response::ok(sample_stats(1)),
            Response::ok(sample_stats(2)),
        ]);
        let socket = agent.socket();
        let run = run_with(
            &["stats", "--watch", "--interval", "0.1", "--socket", &socket],
            false,
            Some(2),
        );
        assert_eq!((run.code, run.err.as_str()), (EXIT_OK, ""));
        assert!(!run.out.contains('\x1b'), "no escapes off a terminal");
        let frames: Vec<&str> = run.out.split("weir stats every 0.1s").collect();
        assert_eq!(frames.len(), 3, "{}", run.out);
        // The first frame has no rates yet; the second does (1000 packets in ~0.1 s).
        assert!(
            frames[1].contains("PKT/S") && frames[1].contains(" - "),
            "{}",
            frames[1]
        );
        let web = frames[2].lines().find(|l| l.starts_with("web ")).unwrap();
        let pps: f64 = web.split_whitespace().nth(2).unwrap().parse().unwrap();
        assert!((5_000.0..=20_000.0).contains(&pps), "{web}");
        agent.requests();
    }

    #[test]
    fn stats_watch_clears_a_terminal() {
        let agent = FakeAgent::start(vec![Response::ok(sample_stats(1))]);
        let socket = agent.socket();
        let run = run_with(&["stats", "-w", "--socket", &socket], true, Some(1));
        assert_eq!(run.code, EXIT_OK, "{}", run.err);
        assert!(run.out.starts_with("\x1b[H\x1b[2Jweir stats every 1s at "));
        agent.requests();
    }

    #[test]
    fn stats_watch_json_is_one_line_per_snapshot() {
        let agent = FakeAgent::start(vec![
            Response::ok(sample_stats(1)),
            Response::ok(sample_stats(2)),
        ]);
        let socket = agent.socket();
        let run = run_with(
            &[
                "stats", "-w", "-n", "0.1", "-o", "json", "--socket", &socket,
            ],
            true,
            Some(2),
        );
        assert_eq!(run.code, EXIT_OK, "{}", run.err);
        let snapshots: Vec<Stats> = run
            .out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(snapshots, [sample_stats(1), sample_stats(2)]);
        agent.requests();
    }

    #[test]
    fn an_error_stops_the_watch() {
        let agent = FakeAgent::start(vec![
            Response::ok(sample_stats(1)),
            Response::error(ErrorCode::Internal, "reading STATS: EPERM"),
        ]);
        let socket = agent.socket();
        let run = run_with(
            &["stats", "-w", "-n", "0.1", "--socket", &socket],
            false,
            None,
        );
        assert_eq!(run.code, EXIT_FAILURE);
        assert_eq!(
            run.out.matches("weir stats every").count(),
            1,
            "{}",
            run.out
        );
        assert_eq!(
            run.err,
            "error: reading STATS: EPERM (see the agent's log)\n"
        );
        agent.requests();
    }
}
