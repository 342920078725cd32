//! The handshake and a blocking host-side client over any `Read + Write`
//! stream.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};

use crate::frame::{read_frame, write_frame, FrameError};
use crate::messages::{
    ContainerRef, CreateContainer, ErrorBody, Exec, ExitStatus, Hello, Outcome, ProcessInfo,
    ProcessRef, Request, RequestFrame, ResizeTty, Response, ResponseFrame, Signal, Stats,
    UpdateResources,
};

/// Protocol-level errors.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// Reading or writing a frame failed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The peer speaks another protocol version.
    #[error(
        "protocol version mismatch: {peer} {peer_version} speaks version {theirs}, \
         {ours_name} speaks version {ours}"
    )]
    VersionMismatch {
        /// Our protocol version.
        ours: u32,
        /// The peer's protocol version.
        theirs: u32,
        /// Our program name.
        ours_name: String,
        /// The peer's program name.
        peer: String,
        /// The peer's program version.
        peer_version: String,
    },
    /// The agent answered with an error.
    #[error("agent error: {0}")]
    Remote(ErrorBody),
    /// The agent answered with a response of the wrong kind.
    #[error("unexpected response to {request}: {response:?}")]
    UnexpectedResponse {
        /// Request kind.
        request: &'static str,
        /// What came back.
        response: Box<Response>,
    },
    /// The agent said something no agent may say (a response to a request
    /// never sent, an exit code out of range): it is not trusted further.
    #[error("invalid answer from the agent: {0}")]
    Invalid(String),
}

/// An exit status as a process can have one (shell-style code 0-255,
/// signal 1-64), or [`ProtoError::Invalid`].
pub fn check_exit(status: ExitStatus) -> Result<ExitStatus, ProtoError> {
    if !(0..=255).contains(&status.exit_code) {
        return Err(ProtoError::Invalid(format!(
            "exit code {} (out of range)",
            status.exit_code
        )));
    }
    if let Some(sig) = status.signal.filter(|s| !(1..=64).contains(s)) {
        return Err(ProtoError::Invalid(format!("signal {sig} (out of range)")));
    }
    Ok(status)
}

/// Sends our `Hello`, reads the peer's and checks the versions match. Both
/// sides call this (each sends first, so neither waits on the other).
pub fn handshake<S: Read + Write + ?Sized>(
    stream: &mut S,
    ours: &Hello,
) -> Result<Hello, ProtoError> {
    write_frame(stream, ours)?;
    let theirs: Hello = read_frame(stream)?;
    check_version(ours, &theirs)?;
    Ok(theirs)
}

/// Fails with [`ProtoError::VersionMismatch`] unless both speak one version.
pub fn check_version(ours: &Hello, theirs: &Hello) -> Result<(), ProtoError> {
    if ours.version == theirs.version {
        return Ok(());
    }
    Err(ProtoError::VersionMismatch {
        ours: ours.version,
        theirs: theirs.version,
        ours_name: ours.name.clone(),
        peer: theirs.name.clone(),
        peer_version: theirs.name_version.clone(),
    })
}

/// A blocking control-connection client. Requests may be pipelined with
/// [`Client::send`]; [`Client::receive`] returns the response to one id and
/// keeps responses to other outstanding ids for later. A response to an id
/// that is not outstanding (never sent, or already answered) is an error,
/// so what the client keeps is bounded by what it sent.
#[derive(Debug)]
pub struct Client<S> {
    stream: S,
    peer: Hello,
    next_id: u64,
    /// Sent, not yet answered.
    outstanding: HashSet<u64>,
    /// Answered, not yet received.
    pending: HashMap<u64, Outcome>,
}

/// A request sent by [`Client::send_ahead`], not yet answered.
#[derive(Debug)]
#[must_use = "its answer must be taken with Client::finish"]
pub struct Ahead {
    id: u64,
    kind: AheadKind,
}

#[derive(Debug, Clone, Copy)]
enum AheadKind {
    Refresh,
    ConfigureNetwork,
}

impl<S: Read + Write> Client<S> {
    /// Performs the handshake on a fresh control connection.
    pub fn connect(mut stream: S, ours: &Hello) -> Result<Self, ProtoError> {
        let peer = handshake(&mut stream, ours)?;
        Ok(Client {
            stream,
            peer,
            next_id: 1,
            outstanding: HashSet::new(),
            pending: HashMap::new(),
        })
    }

    /// The underlying stream (e.g. to change its read timeout).
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// The agent's `Hello`.
    pub fn peer(&self) -> &Hello {
        &self.peer
    }

    /// Sends a request; returns its id.
    pub fn send(&mut self, request: Request) -> Result<u64, ProtoError> {
        let id = self.next_id;
        self.next_id += 1;
        write_frame(&mut self.stream, &RequestFrame { id, request })?;
        self.outstanding.insert(id);
        Ok(id)
    }

    /// Waits for the response to request `id`.
    pub fn receive(&mut self, id: u64) -> Result<Response, ProtoError> {
        let outcome = match self.pending.remove(&id) {
            Some(outcome) => outcome,
            None => loop {
                if !self.outstanding.contains(&id) {
                    return Err(ProtoError::Invalid(format!(
                        "no request {id} is waiting for an answer"
                    )));
                }
                let frame: ResponseFrame = read_frame(&mut self.stream)?;
                if !self.outstanding.remove(&frame.id) {
                    return Err(ProtoError::Invalid(format!(
                        "a response to request {}, which is not outstanding",
                        frame.id
                    )));
                }
                if frame.id == id {
                    break frame.result;
                }
                self.pending.insert(frame.id, frame.result);
            },
        };
        match outcome {
            Outcome::Ok(response) => Ok(response),
            Outcome::Error(e) => Err(ProtoError::Remote(e)),
        }
    }

    /// Sends `request` (one answered with a bare acknowledgement:
    /// `Refresh`, `ConfigureNetwork`) without waiting for its answer, which
    /// [`Self::finish`] takes later. The agent serves one connection's
    /// requests in order, so what is sent after it is served after it; the
    /// round trips overlap.
    pub fn send_ahead(&mut self, request: Request) -> Result<Ahead, ProtoError> {
        let kind = match &request {
            Request::Refresh(_) => AheadKind::Refresh,
            Request::ConfigureNetwork(_) => AheadKind::ConfigureNetwork,
            _ => {
                return Err(ProtoError::Invalid(
                    "only Refresh and ConfigureNetwork can be sent ahead".into(),
                ))
            }
        };
        Ok(Ahead {
            id: self.send(request)?,
            kind,
        })
    }

    /// The answer to a request sent by [`Self::send_ahead`].
    pub fn finish(&mut self, ahead: Ahead) -> Result<(), ProtoError> {
        match (ahead.kind, self.receive(ahead.id)?) {
            (AheadKind::Refresh, Response::Refreshed)
            | (AheadKind::ConfigureNetwork, Response::NetworkConfigured) => Ok(()),
            (AheadKind::Refresh, other) => Err(unexpected("refresh", other)),
            (AheadKind::ConfigureNetwork, other) => Err(unexpected("configure_network", other)),
        }
    }

    /// Sends a request and waits for its response.
    pub fn call(&mut self, request: Request) -> Result<Response, ProtoError> {
        let id = self.send(request)?;
        self.receive(id)
    }

    /// `CreateContainer`.
    pub fn create_container(&mut self, req: CreateContainer) -> Result<ProcessInfo, ProtoError> {
        match self.call(Request::CreateContainer(req))? {
            Response::Created(info) => Ok(info),
            other => Err(unexpected("create_container", other)),
        }
    }

    /// `Start`.
    pub fn start(&mut self, container_id: &str) -> Result<ProcessInfo, ProtoError> {
        let req = Request::Start(ContainerRef {
            container_id: container_id.to_owned(),
        });
        match self.call(req)? {
            Response::Started(info) => Ok(info),
            other => Err(unexpected("start", other)),
        }
    }

    /// `Exec`.
    pub fn exec(&mut self, req: Exec) -> Result<ProcessInfo, ProtoError> {
        match self.call(Request::Exec(req))? {
            Response::ExecStarted(info) => Ok(info),
            other => Err(unexpected("exec", other)),
        }
    }

    /// `Signal`.
    pub fn signal(&mut self, req: Signal) -> Result<(), ProtoError> {
        match self.call(Request::Signal(req))? {
            Response::Signaled => Ok(()),
            other => Err(unexpected("signal", other)),
        }
    }

    /// `Wait` (blocks until the process exits).
    /// The status is checked: an exit code 0-255, a signal 1-64.
    pub fn wait(&mut self, req: ProcessRef) -> Result<ExitStatus, ProtoError> {
        match self.call(Request::Wait(req))? {
            Response::Exited(status) => check_exit(status),
            other => Err(unexpected("wait", other)),
        }
    }

    /// `ResizeTty`.
    pub fn resize_tty(&mut self, req: ResizeTty) -> Result<(), ProtoError> {
        match self.call(Request::ResizeTty(req))? {
            Response::TtyResized => Ok(()),
            other => Err(unexpected("resize_tty", other)),
        }
    }

    /// `Stats`.
    pub fn stats(&mut self, container_id: &str) -> Result<Stats, ProtoError> {
        let req = Request::Stats(ContainerRef {
            container_id: container_id.to_owned(),
        });
        match self.call(req)? {
            Response::Stats(stats) => Ok(stats),
            other => Err(unexpected("stats", other)),
        }
    }

    /// `UpdateResources`.
    pub fn update_resources(&mut self, req: UpdateResources) -> Result<(), ProtoError> {
        match self.call(Request::UpdateResources(req))? {
            Response::ResourcesUpdated => Ok(()),
            other => Err(unexpected("update_resources", other)),
        }
    }

    /// `Shutdown`.
    pub fn shutdown(&mut self) -> Result<(), ProtoError> {
        match self.call(Request::Shutdown)? {
            Response::ShuttingDown => Ok(()),
            other => Err(unexpected("shutdown", other)),
        }
    }

    /// Gives the stream back.
    pub fn into_inner(self) -> S {
        self.stream
    }
}

fn unexpected(request: &'static str, response: Response) -> ProtoError {
    ProtoError::UnexpectedResponse {
        request,
        response: Box::new(response),
    }
}
