//! The control and stdio servers: accept loops and the control-connection
//! request loop, generic over the transport.

use std::sync::{Arc, Mutex};
use std::thread;

use husk_proto::{
    handshake, read_frame_bytes, write_frame, ErrorBody, ErrorCode, FrameError, Hello, Outcome,
    Request, RequestFrame, ResponseFrame,
};

use crate::agent::Agent;
use crate::log;
use crate::stdio::serve_stdio;
use crate::transport::{Conn, Listener};

/// The agent's `Hello`, stamped with its clock.
pub fn agent_hello() -> Hello {
    Hello {
        clock_ns: Some(crate::sys::boottime_ns()),
        ..Hello::new("husk-agent", env!("CARGO_PKG_VERSION"))
    }
}

/// Accepts control connections forever, one thread each.
pub fn serve_control_forever<L: Listener>(agent: Arc<Agent>, listener: L) {
    accept_forever(listener, "control", move |conn| serve_control(&agent, conn));
}

/// Accepts stdio connections forever, one thread each.
pub fn serve_stdio_forever<L: Listener>(agent: Arc<Agent>, listener: L) {
    accept_forever(listener, "stdio", move |conn| serve_stdio(&agent, conn));
}

fn accept_forever<L: Listener, F>(listener: L, what: &'static str, handler: F)
where
    F: Fn(L::Conn) + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    loop {
        match listener.accept_conn() {
            Ok(conn) => {
                let h = Arc::clone(&handler);
                if let Err(e) = thread::Builder::new()
                    .name(what.into())
                    .spawn(move || h(conn))
                {
                    log!("{what}: cannot start a connection thread: {e}");
                }
            }
            Err(e) => {
                log!("{what}: accept: {e}");
                thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}

/// Serves one control connection: handshake, then requests until the host
/// closes it. `Wait` is answered from its own thread when the process
/// exits; responses share one writer.
pub fn serve_control<C: Conn>(agent: &Arc<Agent>, mut conn: C) {
    if let Err(e) = handshake(&mut conn, &agent_hello()) {
        log!("control connection: {e}");
        return;
    }
    let _attached = agent.host_attached();
    let writer = match conn.try_clone_conn() {
        Ok(w) => Arc::new(Mutex::new(w)),
        Err(e) => {
            log!("control connection: {e}");
            return;
        }
    };
    loop {
        let frame = match read_frame_bytes(&mut conn) {
            Ok(body) => body,
            Err(FrameError::Closed) => return,
            Err(e) => {
                // The stream is out of sync; nothing more can be trusted.
                log!("control connection: {e}");
                return;
            }
        };
        let (id, request) = match serde_json::from_slice::<RequestFrame>(&frame) {
            Ok(f) => (f.id, f.request),
            Err(e) => {
                // Answer the id if one can be found, then go on: the frame
                // boundary is intact.
                let id = serde_json::from_slice::<serde_json::Value>(&frame)
                    .ok()
                    .and_then(|v| v.get("id")?.as_u64())
                    .unwrap_or(0);
                let error = ErrorBody {
                    code: ErrorCode::InvalidRequest,
                    message: format!("invalid request: {e}"),
                };
                respond(&writer, id, Err(error));
                continue;
            }
        };
        match request {
            Request::Wait(r) => {
                let agent = Arc::clone(agent);
                let w = Arc::clone(&writer);
                let spawned = thread::Builder::new()
                    .name("wait".into())
                    .spawn(move || match agent.wait(&r) {
                        Ok((proc, status)) => {
                            let ok = Ok(husk_proto::Response::Exited(status));
                            if respond(&w, id, ok) {
                                proc.set_delivered();
                            }
                        }
                        Err(e) => {
                            respond(&w, id, Err(e));
                        }
                    });
                if let Err(e) = spawned {
                    let error = ErrorBody {
                        code: ErrorCode::Internal,
                        message: format!("cannot start a wait thread: {e}"),
                    };
                    respond(&writer, id, Err(error));
                }
            }
            Request::Shutdown => {
                respond(&writer, id, Ok(husk_proto::Response::ShuttingDown));
                agent.shutdown();
                return;
            }
            other => {
                let result = agent.handle(other);
                respond(&writer, id, result);
            }
        }
    }
}

/// Writes one response; returns whether it was sent.
fn respond<C: Conn>(
    writer: &Mutex<C>,
    id: u64,
    result: Result<husk_proto::Response, ErrorBody>,
) -> bool {
    let result = match result {
        Ok(r) => Outcome::Ok(r),
        Err(e) => Outcome::Error(e),
    };
    let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
    match write_frame(&mut *w, &ResponseFrame { id, result }) {
        Ok(()) => true,
        Err(e) => {
            log!("control connection: {e}");
            false
        }
    }
}
