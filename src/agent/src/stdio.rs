//! Stdio connections: the `StreamHello` exchange, then raw bytes between
//! the connection and the process's pipe or pty master.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::thread;

use husk_proto::{
    read_frame, write_frame, ErrorBody, ErrorCode, StreamHello, StreamKind, StreamReply,
    PROTOCOL_VERSION,
};

use crate::agent::Agent;
use crate::log;
use crate::state::{AttachError, Proc};
use crate::transport::Conn;

const BUF_SIZE: usize = 64 * 1024;

/// Serves one stdio connection until its stream ends.
pub fn serve_stdio<C: Conn>(agent: &Agent, mut conn: C) {
    let hello: StreamHello = match read_frame(&mut conn) {
        Ok(h) => h,
        Err(e) => {
            log!("stdio connection: {e}");
            return;
        }
    };
    let (proc, fd) = match attach(agent, &hello) {
        Ok(v) => v,
        Err(e) => {
            let _ = write_frame(&mut conn, &StreamReply::Rejected(e));
            return;
        }
    };
    let is_output = hello.stream != StreamKind::Stdin;
    if is_output {
        proc.relays.begin();
    }
    if let Err(e) = write_frame(&mut conn, &StreamReply::Attached) {
        log!("stdio connection: {e}");
    }
    match hello.stream {
        StreamKind::Stdin => relay_input(conn, File::from(fd)),
        StreamKind::Stdout | StreamKind::Stderr => relay_output(File::from(fd), conn),
        StreamKind::Pty => relay_pty(fd, conn),
    }
    if is_output {
        proc.relays.end();
    }
}

fn attach(agent: &Agent, hello: &StreamHello) -> Result<(Arc<Proc>, OwnedFd), ErrorBody> {
    if hello.version != PROTOCOL_VERSION {
        return Err(ErrorBody {
            code: ErrorCode::InvalidRequest,
            message: format!(
                "protocol version mismatch: the stream speaks version {}, husk-agent {} speaks version {PROTOCOL_VERSION}",
                hello.version,
                env!("CARGO_PKG_VERSION"),
            ),
        });
    }
    let wait = std::time::Duration::from_millis(hello.wait_ms);
    let proc = agent.find_stream_process(&hello.container_id, hello.exec_id.as_deref(), wait)?;
    let fd = proc.take_stream(hello.stream).map_err(|e| {
        let message = match e {
            AttachError::AlreadyAttached => format!("{:?} is already attached", hello.stream),
            AttachError::NoSuchStream if hello.stream == StreamKind::Pty => {
                "the process has no terminal".to_owned()
            }
            AttachError::NoSuchStream if proc.terminal => {
                "the process has a terminal: attach the pty stream".to_owned()
            }
            AttachError::NoSuchStream => "stdin was not requested at creation".to_owned(),
        };
        ErrorBody {
            code: ErrorCode::InvalidState,
            message,
        }
    })?;
    Ok((proc, fd))
}

/// Process output -> connection, then half-close. If the host goes away,
/// keeps draining so the process does not block on a full pipe.
fn relay_output<C: Conn>(mut from: File, mut to: C) {
    let mut buf = vec![0u8; BUF_SIZE];
    let mut host_gone = false;
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) if !host_gone => host_gone = to.write_all(&buf[..n]).is_err(),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // EIO: a pty master whose slave side is all closed.
            Err(_) => break,
        }
    }
    let _ = to.shutdown_write();
}

/// Connection -> process input; end of stream closes the process's stdin.
fn relay_input<C: Conn>(mut from: C, mut to: File) {
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
}

/// Both directions of a pty: output in this thread, input in another.
fn relay_pty<C: Conn>(master: OwnedFd, conn: C) {
    let input = match (conn.try_clone_conn(), master.try_clone()) {
        (Ok(c), Ok(m)) => Some(thread::spawn(move || relay_input(c, File::from(m)))),
        _ => None,
    };
    relay_output(File::from(master), conn);
    // The input thread ends when the host closes its side.
    drop(input);
}
