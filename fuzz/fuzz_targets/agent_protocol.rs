//! The agent protocol in both directions.
//!
//! Host side (the agent is hostile): a `Client` whose agent speaks the
//! input (its `Hello`, then response frames, in any order or none) is
//! driven through the calls a sandbox makes; each must return a value or
//! an error (exit statuses range-checked), never panic, and never wait for
//! more than the input holds.
//!
//! Guest side (the host's requests, and the OCI specs in them): the input
//! read as request frames, each planned as the agent would before it forks
//! (OCI spec -> container plan, with its seccomp profile compiled and its
//! device rules; an exec's process -> process plan).
#![no_main]

use std::io::{self, Read, Write};

use husk_agent::container::plan::{plan_container, plan_process};
use husk_proto::oci_spec::runtime::Process;
use husk_proto::{read_frame, Client, Exec, Hello, ProcessRef, Request, RequestFrame, Signal};
use libfuzzer_sys::fuzz_target;

/// Reads come from the input; writes go nowhere.
struct Agent<'a>(&'a [u8]);

impl Read for Agent<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Agent<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The last capability number of the guest kernel the plans assume.
const CAP_LAST_CAP: u32 = 40;

fuzz_target!(|data: &[u8]| {
    if let Ok(mut c) = Client::connect(Agent(data), &Hello::new("husk-fuzz", "0")) {
        let process = || ProcessRef {
            container_id: "c".into(),
            exec_id: None,
        };
        let _ = c.start("c");
        let _ = c.exec(Exec {
            container_id: "c".into(),
            exec_id: "e".into(),
            process: Box::new(Process::default()),
            stdin: false,
        });
        let _ = c.signal(Signal {
            container_id: "c".into(),
            exec_id: None,
            signal: 15,
        });
        let _ = c.stats("c");
        if let Ok(status) = c.wait(process()) {
            assert!((0..=255).contains(&status.exit_code));
        }
        // Pipelined: answers may come in any order, or to ids never sent.
        let ids: Vec<u64> = (0..3)
            .filter_map(|_| c.send(Request::Wait(process())).ok())
            .collect();
        for id in ids.into_iter().rev() {
            let _ = c.receive(id);
        }
        let _ = c.shutdown();
    }

    let mut requests = data;
    while let Ok(frame) = read_frame::<_, RequestFrame>(&mut requests) {
        match frame.request {
            Request::CreateContainer(req) => {
                let _ = plan_container(&req.spec, CAP_LAST_CAP);
            }
            Request::Exec(req) => {
                let _ = plan_process(&req.process, CAP_LAST_CAP);
            }
            _ => {}
        }
    }
});
