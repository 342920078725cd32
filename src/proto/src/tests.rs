use std::fmt::Debug;
use std::io::{Cursor, Read, Write};
use std::os::unix::net::UnixStream;
use std::thread;

use oci_spec::runtime::{Process, Spec};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::*;

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(msg: &T) {
    let mut buf = Vec::new();
    write_frame(&mut buf, msg).unwrap();
    let len = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
    assert_eq!(len, buf.len() - 4);
    let back: T = read_frame(&mut Cursor::new(&buf)).unwrap();
    assert_eq!(&back, msg);
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut v = (body.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

fn timestamps() -> Timestamps {
    Timestamps {
        agent_started_ns: 1,
        agent_ready_ns: 2,
        created_ns: Some(3),
        exec_ns: Some(4),
        exited_ns: None,
    }
}

fn all_requests() -> Vec<Request> {
    vec![
        Request::CreateContainer(CreateContainer {
            container_id: "c1".into(),
            spec: Box::default(),
            rootfs: Rootfs {
                device: "/dev/vda".into(),
                fstype: "ext4".into(),
                read_only: true,
                size_bytes: None,
            },
            scratch: Scratch::Device {
                device: "/dev/vdb".into(),
                fstype: "ext4".into(),
            },
            stdin: true,
            files: Vec::new(),
            shares: Vec::new(),
        }),
        Request::Start(ContainerRef {
            container_id: "c1".into(),
        }),
        Request::Exec(Exec {
            container_id: "c1".into(),
            exec_id: "e1".into(),
            process: Box::default(),
            stdin: false,
        }),
        Request::Signal(Signal {
            container_id: "c1".into(),
            exec_id: Some("e1".into()),
            signal: 15,
        }),
        Request::Wait(ProcessRef {
            container_id: "c1".into(),
            exec_id: None,
        }),
        Request::ResizeTty(ResizeTty {
            container_id: "c1".into(),
            exec_id: None,
            rows: 24,
            cols: 80,
        }),
        Request::Stats(ContainerRef {
            container_id: "c1".into(),
        }),
        Request::UpdateResources(UpdateResources {
            container_id: "c1".into(),
            resources: Box::default(),
        }),
        Request::ConfigureNetwork(Network {
            interfaces: vec![Interface {
                mac: "02:42:ac:11:00:02".into(),
                device_mac: Some("02:68:75:73:6b:00".into()),
                name: "eth0".into(),
                mtu: Some(1500),
                addresses: vec!["172.17.0.2/16".into()],
            }],
            routes: vec![Route {
                destination: "default".into(),
                gateway: Some("172.17.0.1".into()),
                device: "eth0".into(),
            }],
        }),
        Request::Shutdown,
    ]
}

fn all_responses() -> Vec<Outcome> {
    let info = ProcessInfo {
        pid: 42,
        timestamps: timestamps(),
        setup: Vec::new(),
    };
    let created = ProcessInfo {
        setup: vec![
            SetupStep {
                step: "start".into(),
                ns: 1,
            },
            SetupStep {
                step: "rootfs".into(),
                ns: 2,
            },
        ],
        ..info.clone()
    };
    vec![
        Outcome::Ok(Response::Created(created)),
        Outcome::Ok(Response::Started(info.clone())),
        Outcome::Ok(Response::ExecStarted(info)),
        Outcome::Ok(Response::Signaled),
        Outcome::Ok(Response::Exited(ExitStatus {
            exit_code: 137,
            signal: Some(9),
            oom_killed: true,
            output_drained: true,
            timestamps: timestamps(),
        })),
        Outcome::Ok(Response::TtyResized),
        Outcome::Ok(Response::Stats(Stats {
            memory_usage_bytes: 1 << 20,
            memory_max_usage_bytes: Some(2 << 20),
            memory_limit_bytes: None,
            cpu_usage_ns: 5,
            pids_current: Some(3),
            oom_kills: 0,
        })),
        Outcome::Ok(Response::ShuttingDown),
        Outcome::Ok(Response::NetworkConfigured),
        Outcome::Ok(Response::ResourcesUpdated),
        Outcome::Error(ErrorBody {
            code: ErrorCode::NotFound,
            message: "no container c2".into(),
        }),
    ]
}

#[test]
fn every_request_round_trips() {
    for (id, request) in all_requests().into_iter().enumerate() {
        round_trip(&RequestFrame {
            id: id as u64,
            request,
        });
    }
}

#[test]
fn every_response_round_trips() {
    for (id, result) in all_responses().into_iter().enumerate() {
        round_trip(&ResponseFrame {
            id: id as u64,
            result,
        });
    }
}

#[test]
fn hello_and_stream_messages_round_trip() {
    round_trip(&Hello::new("husk", "0.1.0"));
    round_trip(&Hello {
        clock_ns: Some(1_234_567_890),
        ..Hello::new("husk-agent", "0.1.0")
    });
    // The host's Hello carries no clock, and an agent's without one parses.
    let host = serde_json::to_string(&Hello::new("husk", "0.1.0")).unwrap();
    assert!(!host.contains("clock_ns"), "{host}");
    for stream in [
        StreamKind::Stdin,
        StreamKind::Stdout,
        StreamKind::Stderr,
        StreamKind::Pty,
    ] {
        round_trip(&StreamHello {
            version: PROTOCOL_VERSION,
            container_id: "c1".into(),
            exec_id: Some("e1".into()),
            stream,
            wait_ms: 0,
        });
    }
    round_trip(&StreamReply::Attached);
    round_trip(&StreamReply::Rejected(ErrorBody {
        code: ErrorCode::InvalidState,
        message: "stdout already attached".into(),
    }));
}

#[test]
fn wire_format_is_documented_shape() {
    let json = serde_json::to_string(&RequestFrame {
        id: 7,
        request: Request::Start(ContainerRef {
            container_id: "c1".into(),
        }),
    })
    .unwrap();
    assert_eq!(
        json,
        r#"{"id":7,"request":{"start":{"container_id":"c1"}}}"#
    );
    let json = serde_json::to_string(&Request::Shutdown).unwrap();
    assert_eq!(json, r#""shutdown""#);
    let json = serde_json::to_string(&Scratch::default()).unwrap();
    assert_eq!(json, r#"{"kind":"tmpfs","size_bytes":null}"#);
}

#[test]
fn create_container_accepts_a_real_config_json() {
    let spec = serde_json::to_value(Spec::default()).unwrap();
    let json = serde_json::json!({
        "id": 1,
        "request": {"create_container": {
            "container_id": "c1",
            "spec": spec,
            "rootfs": {"device": "/dev/vda", "fstype": "ext4", "read_only": true}
        }}
    });
    let frame: RequestFrame = serde_json::from_value(json).unwrap();
    let Request::CreateContainer(c) = frame.request else {
        panic!("wrong variant");
    };
    assert_eq!(c.scratch, Scratch::Tmpfs { size_bytes: None });
    assert!(!c.stdin);
    assert_eq!(c.spec.process().as_ref().unwrap().cwd().to_str(), Some("/"));
}

#[test]
fn unknown_fields_are_rejected() {
    let cases = [
        r#"{"version":1,"name":"x","name_version":"1","extra":true}"#,
        r#"{"id":1,"request":{"start":{"container_id":"c1","force":true}}}"#,
        r#"{"id":1,"request":"shutdown","priority":1}"#,
        r#"{"id":1,"request":{"reboot":{}}}"#,
        r#"{"id":1,"result":{"ok":{"stats":{"memory_usage_bytes":1,"cpu_usage_ns":1,"oom_kills":0,"swap":1}}}}"#,
    ];
    let hello: Result<Hello, _> = read_frame(&mut Cursor::new(frame(cases[0].as_bytes())));
    assert!(matches!(hello, Err(FrameError::Json(_))), "{hello:?}");
    for case in &cases[1..4] {
        let r: Result<RequestFrame, _> = read_frame(&mut Cursor::new(frame(case.as_bytes())));
        assert!(matches!(r, Err(FrameError::Json(_))), "{case}: {r:?}");
    }
    let r: Result<ResponseFrame, _> = read_frame(&mut Cursor::new(frame(cases[4].as_bytes())));
    assert!(matches!(r, Err(FrameError::Json(_))), "{r:?}");
    let scratch: Result<Scratch, _> =
        serde_json::from_str(r#"{"kind":"tmpfs","size_bytes":1,"noexec":true}"#);
    assert!(scratch.is_err());
}

#[test]
fn oversized_frame_is_rejected_from_the_header() {
    // A header announcing 4 GiB with no body: the reader must fail without
    // trying to allocate or read it.
    let mut r = Cursor::new(u32::MAX.to_be_bytes().to_vec());
    let err = read_frame_bytes(&mut r).unwrap_err();
    assert!(matches!(err, FrameError::TooLarge(n) if n == u64::from(u32::MAX)));
    assert_eq!(r.position(), 4);
    let err = read_frame_bytes(&mut Cursor::new((MAX_FRAME_SIZE + 1).to_be_bytes())).unwrap_err();
    assert!(err.to_string().contains("exceeds the limit"), "{err}");

    // Exactly the limit is fine.
    let mut ok = MAX_FRAME_SIZE.to_be_bytes().to_vec();
    ok.resize(4 + MAX_FRAME_SIZE as usize, b' ');
    assert_eq!(
        read_frame_bytes(&mut Cursor::new(ok)).unwrap().len(),
        MAX_FRAME_SIZE as usize
    );

    // The writer refuses too.
    let big = "x".repeat(MAX_FRAME_SIZE as usize);
    let err = write_frame(&mut Vec::new(), &big).unwrap_err();
    assert!(matches!(err, FrameError::TooLarge(_)));
}

#[test]
fn truncated_frames_are_errors() {
    let err = read_frame_bytes(&mut Cursor::new(vec![0u8, 0])).unwrap_err();
    assert!(
        matches!(
            err,
            FrameError::Truncated {
                expected: 4,
                got: 2
            }
        ),
        "{err:?}"
    );
    let mut short = frame(br#"{"id":1}"#);
    short.truncate(short.len() - 3);
    let err = read_frame_bytes(&mut Cursor::new(short)).unwrap_err();
    assert!(
        matches!(
            err,
            FrameError::Truncated {
                expected: 8,
                got: 5
            }
        ),
        "{err:?}"
    );
    let err = read_frame_bytes(&mut Cursor::new(Vec::new())).unwrap_err();
    assert!(matches!(err, FrameError::Closed));
}

#[test]
fn garbage_is_an_invalid_message() {
    for body in [&b"not json"[..], b"", b"{\"id\":", &[0xff, 0xfe, 0x00]] {
        let r: Result<RequestFrame, _> = read_frame(&mut Cursor::new(frame(body)));
        assert!(matches!(r, Err(FrameError::Json(_))), "{body:?}: {r:?}");
    }
}

#[test]
fn reader_stops_at_the_frame_end() {
    let mut bytes = Vec::new();
    write_frame(
        &mut bytes,
        &StreamHello {
            version: PROTOCOL_VERSION,
            container_id: "c".into(),
            exec_id: None,
            stream: StreamKind::Stdin,
            wait_ms: 0,
        },
    )
    .unwrap();
    bytes.extend_from_slice(b"raw stdin bytes");
    let mut r = Cursor::new(bytes);
    let _: StreamHello = read_frame(&mut r).unwrap();
    let mut rest = String::new();
    r.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "raw stdin bytes");
}

#[test]
fn handshake_accepts_the_same_version() {
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let agent = thread::spawn(move || handshake(&mut b, &Hello::new("husk-agent", "0.1.0")));
    let peer = handshake(&mut a, &Hello::new("husk", "0.1.0")).unwrap();
    assert_eq!(peer.name, "husk-agent");
    assert_eq!(agent.join().unwrap().unwrap().name, "husk");
}

#[test]
fn handshake_rejects_a_version_mismatch_on_both_sides() {
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let mut newer = Hello::new("husk-agent", "0.2.0");
    newer.version = PROTOCOL_VERSION + 1;
    let agent = thread::spawn(move || handshake(&mut b, &newer));
    let err = handshake(&mut a, &Hello::new("husk", "0.1.0")).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ProtoError::VersionMismatch { .. }));
    assert!(
        msg.contains(&format!(
            "husk-agent 0.2.0 speaks version {}",
            PROTOCOL_VERSION + 1
        )) && msg.contains(&format!("husk speaks version {PROTOCOL_VERSION}")),
        "{msg}"
    );
    let err = agent.join().unwrap().unwrap_err();
    assert!(
        matches!(err, ProtoError::VersionMismatch { ours, theirs, .. }
        if ours == PROTOCOL_VERSION + 1 && theirs == PROTOCOL_VERSION)
    );
}

/// A fake agent: answers `Wait` last, the rest in order.
fn fake_agent(mut s: UnixStream) {
    handshake(&mut s, &Hello::new("fake-agent", "0")).unwrap();
    let mut waits = Vec::new();
    loop {
        let frame: RequestFrame = match read_frame(&mut s) {
            Ok(f) => f,
            Err(FrameError::Closed) => return,
            Err(e) => panic!("{e}"),
        };
        let result = match frame.request {
            Request::Wait(_) => {
                waits.push(frame.id);
                continue;
            }
            Request::Start(_) => Outcome::Ok(Response::Started(ProcessInfo {
                pid: 7,
                timestamps: Timestamps::default(),
                setup: Vec::new(),
            })),
            Request::Stats(_) => Outcome::Error(ErrorBody {
                code: ErrorCode::NotFound,
                message: "no such container".into(),
            }),
            Request::Signal(_) => Outcome::Ok(Response::TtyResized),
            Request::Shutdown => {
                for id in waits.drain(..) {
                    let result = Outcome::Ok(Response::Exited(ExitStatus {
                        exit_code: 3,
                        signal: None,
                        oom_killed: false,
                        output_drained: true,
                        timestamps: Timestamps::default(),
                    }));
                    write_frame(&mut s, &ResponseFrame { id, result }).unwrap();
                }
                Outcome::Ok(Response::ShuttingDown)
            }
            other => panic!("unexpected {other:?}"),
        };
        write_frame(
            &mut s,
            &ResponseFrame {
                id: frame.id,
                result,
            },
        )
        .unwrap();
    }
}

#[test]
fn client_matches_out_of_order_responses_and_types_errors() {
    let (a, b) = UnixStream::pair().unwrap();
    let agent = thread::spawn(move || fake_agent(b));
    let mut client = Client::connect(a, &Hello::new("husk", "0.1.0")).unwrap();
    assert_eq!(client.peer().name, "fake-agent");

    let wait_id = client
        .send(Request::Wait(ProcessRef {
            container_id: "c1".into(),
            exec_id: None,
        }))
        .unwrap();
    assert_eq!(client.start("c1").unwrap().pid, 7);
    let err = client.stats("c1").unwrap_err();
    assert!(
        matches!(&err, ProtoError::Remote(e) if e.code == ErrorCode::NotFound),
        "{err}"
    );
    let err = client
        .signal(Signal {
            container_id: "c1".into(),
            exec_id: None,
            signal: 9,
        })
        .unwrap_err();
    assert!(matches!(
        err,
        ProtoError::UnexpectedResponse {
            request: "signal",
            ..
        }
    ));
    // The wait answer arrives before the shutdown answer and is kept.
    client.shutdown().unwrap();
    let Response::Exited(status) = client.receive(wait_id).unwrap() else {
        panic!("not exited");
    };
    assert_eq!(status.exit_code, 3);
    drop(client);
    agent.join().unwrap();
}

/// An agent that answers every request with `answers` (id, result) in
/// order, whatever was asked.
fn scripted_agent(mut s: UnixStream, answers: Vec<(u64, Outcome)>) {
    handshake(&mut s, &Hello::new("hostile-agent", "0")).unwrap();
    for (id, result) in answers {
        if read_frame::<_, RequestFrame>(&mut s).is_err() {
            return;
        }
        if write_frame(&mut s, &ResponseFrame { id, result }).is_err() {
            return;
        }
    }
}

fn exited(exit_code: i32, signal: Option<i32>) -> Outcome {
    Outcome::Ok(Response::Exited(ExitStatus {
        exit_code,
        signal,
        oom_killed: false,
        output_drained: true,
        timestamps: Timestamps::default(),
    }))
}

fn wait_req() -> ProcessRef {
    ProcessRef {
        container_id: "c1".into(),
        exec_id: None,
    }
}

#[test]
fn requests_sent_ahead_are_answered_after_what_followed_them() {
    let refresh = || {
        Request::Refresh(Refresh {
            entropy: vec![1; 64],
            realtime_ns: 1,
        })
    };
    // The agent answers in order: Refreshed (id 1), then Exited (id 2);
    // the client reads both while it waits for the second.
    let (a, b) = UnixStream::pair().unwrap();
    let answers = vec![(1, Outcome::Ok(Response::Refreshed)), (2, exited(3, None))];
    let agent = thread::spawn(move || scripted_agent(b, answers));
    let mut client = Client::connect(a, &Hello::new("husk", "0.1.0")).unwrap();
    let ahead = client.send_ahead(refresh()).unwrap();
    assert_eq!(client.wait(wait_req()).unwrap().exit_code, 3);
    client.finish(ahead).unwrap();
    drop(client);
    agent.join().unwrap();
    // An answer of another kind, or an error, fails the request sent ahead.
    for answer in [
        Outcome::Ok(Response::NetworkConfigured),
        Outcome::Error(ErrorBody {
            code: ErrorCode::Internal,
            message: "no entropy".into(),
        }),
    ] {
        let (a, b) = UnixStream::pair().unwrap();
        let agent = thread::spawn(move || scripted_agent(b, vec![(1, answer)]));
        let mut client = Client::connect(a, &Hello::new("husk", "0.1.0")).unwrap();
        let ahead = client.send_ahead(refresh()).unwrap();
        let err = client.finish(ahead).unwrap_err();
        assert!(
            matches!(
                err,
                ProtoError::UnexpectedResponse { .. } | ProtoError::Remote(_)
            ),
            "{err}"
        );
        drop(client);
        agent.join().unwrap();
    }
    // Only bare-acknowledgement requests can be sent ahead.
    let (a, b) = UnixStream::pair().unwrap();
    let agent = thread::spawn(move || scripted_agent(b, vec![]));
    let mut client = Client::connect(a, &Hello::new("husk", "0.1.0")).unwrap();
    assert!(matches!(
        client.send_ahead(Request::Wait(wait_req())),
        Err(ProtoError::Invalid(_))
    ));
    drop(client);
    agent.join().unwrap();
}

#[test]
fn responses_to_requests_never_sent_are_refused_not_kept() {
    // Each answer names an id the client never used: the client must not
    // keep it (a flood of them would grow without bound) but fail.
    for bogus in [0, 2, 99, u64::MAX] {
        let (a, b) = UnixStream::pair().unwrap();
        let agent = thread::spawn(move || scripted_agent(b, vec![(bogus, exited(0, None))]));
        let mut client = Client::connect(a, &Hello::new("husk", "0.1.0")).unwrap();
        let err = client.wait(wait_req()).unwrap_err();
        assert!(matches!(err, ProtoError::Invalid(_)), "{bogus}: {err}");
        drop(client);
        agent.join().unwrap();
    }
    // An id answered twice: the second answer is refused too.
    let (a, b) = UnixStream::pair().unwrap();
    let agent =
        thread::spawn(move || scripted_agent(b, vec![(1, exited(0, None)), (1, exited(0, None))]));
    let mut client = Client::connect(a, &Hello::new("husk", "0.1.0")).unwrap();
    client.wait(wait_req()).unwrap();
    let err = client.wait(wait_req()).unwrap_err();
    assert!(matches!(err, ProtoError::Invalid(_)), "{err}");
    // Receiving an id that is not outstanding fails without reading.
    assert!(matches!(client.receive(7), Err(ProtoError::Invalid(_))));
    drop(client);
    agent.join().unwrap();
}

#[test]
fn exit_statuses_out_of_range_are_errors() {
    for (code, signal, ok) in [
        (0, None, true),
        (255, None, true),
        (137, Some(9), true),
        (256, None, false),
        (-1, None, false),
        (i32::MAX, None, false),
        (128, Some(0), false),
        (128, Some(65), false),
    ] {
        let (a, b) = UnixStream::pair().unwrap();
        let agent = thread::spawn(move || scripted_agent(b, vec![(1, exited(code, signal))]));
        let mut client = Client::connect(a, &Hello::new("husk", "0.1.0")).unwrap();
        let got = client.wait(wait_req());
        assert_eq!(got.is_ok(), ok, "{code} {signal:?}: {got:?}");
        if let Err(e) = got {
            assert!(matches!(e, ProtoError::Invalid(_)), "{e}");
        }
        drop(client);
        agent.join().unwrap();
    }
}

#[test]
fn a_peer_closing_mid_frame_is_reported() {
    let (mut a, mut b) = UnixStream::pair().unwrap();
    b.write_all(&[0, 0, 0, 10, b'{']).unwrap();
    drop(b);
    let err = read_frame::<_, Hello>(&mut a).unwrap_err();
    assert!(matches!(
        err,
        FrameError::Truncated {
            expected: 10,
            got: 1
        }
    ));
}

#[test]
fn exec_carries_an_oci_process() {
    let mut process = Process::default();
    process.set_args(Some(vec!["sh".into(), "-c".into(), "exit 3".into()]));
    round_trip(&Request::Exec(Exec {
        container_id: "c".into(),
        exec_id: "e".into(),
        process: Box::new(process),
        stdin: true,
    }));
}
