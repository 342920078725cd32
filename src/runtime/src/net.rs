//! A container's network namespace on the host and the VM's place in it.
//!
//! The VMM process lives in the namespace the OCI config names (a new one,
//! or a path such as CNI's or Podman's). The interfaces the caller put there
//! (a veth from Docker's bridge, CNI) become the VM's: for each, a tap in
//! the same namespace, joined to the veth by tc mirred redirects both ways
//! (Kata's "tcfilter" model), and a virtio-net device with the veth's MAC;
//! the agent gives the guest interface the veth's name, addresses, MTU and
//! routes. IPv4 only: the guest kernel has no IPv6.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;

use husk_proto::{Interface, Network, Route};
use husk_vmm::config::NetConfig;
use serde::{Deserialize, Serialize};

use crate::RuntimeError;

/// Which network namespace the VMM process is in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Netns {
    /// The caller's (the config has no network namespace): the guest gets
    /// only `lo`.
    Host,
    /// A new, empty one, made by the VMM process (its interfaces arrive
    /// from the caller's hooks, e.g. Docker's prestart hook).
    New,
    /// An existing one.
    Path(PathBuf),
}

impl Netns {
    /// The namespace `spec` asks for.
    pub fn of(spec: &oci_spec::runtime::Spec) -> Self {
        let ns = spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().as_ref())
            .and_then(|n| {
                n.iter()
                    .find(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Network)
                    .cloned()
            });
        match ns {
            None => Netns::Host,
            Some(n) => match n.path() {
                Some(p) => Netns::Path(p.clone()),
                None => Netns::New,
            },
        }
    }

    /// Moves the calling thread (call it from the main thread before any
    /// other exists, so that `/proc/PID/ns/net` shows it) into the
    /// namespace; returns the namespace it was in, for hooks, which run in
    /// the caller's.
    pub fn enter(&self) -> Result<Option<OwnedFd>, RuntimeError> {
        if *self == Netns::Host {
            return Ok(None);
        }
        let orig = open_ns(Path::new("/proc/thread-self/ns/net"))?;
        match self {
            Netns::Host => {}
            Netns::New => {
                // SAFETY: unshare(2) with a namespace flag; no memory involved.
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                    return Err(RuntimeError::Io(
                        "new network namespace".into(),
                        std::io::Error::last_os_error(),
                    ));
                }
            }
            Netns::Path(p) => setns(&open_ns(p)?, p)?,
        }
        Ok(Some(orig))
    }
}

fn open_ns(p: &Path) -> Result<OwnedFd, RuntimeError> {
    std::fs::File::open(p)
        .map(OwnedFd::from)
        .map_err(|e| RuntimeError::Io(format!("network namespace {}", p.display()), e))
}

fn setns(fd: &OwnedFd, p: &Path) -> Result<(), RuntimeError> {
    // SAFETY: setns(2) on a descriptor we own.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(RuntimeError::Io(
            format!("join network namespace {}", p.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// One host interface the VM takes over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    /// The interface the caller made (a veth).
    pub veth: String,
    /// The tap husk makes next to it.
    pub tap: String,
    /// The veth's MAC, which the guest's NIC gets.
    pub mac: String,
    /// The veth's MTU.
    pub mtu: u32,
    /// Its IPv4 addresses, CIDR form.
    pub addresses: Vec<String>,
}

/// The interfaces and routes of a container's namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostNetwork {
    /// Interfaces the VM takes over.
    pub links: Vec<Link>,
    /// IPv4 routes other than those the addresses imply.
    pub routes: Vec<Route>,
}

/// Finds `ip`/`tc`: callers such as containerd's shim may run husk with an
/// empty PATH.
fn tool(name: &str) -> PathBuf {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Runs `prog args`; its stdout, or an error with its last stderr line.
fn run(prog: &str, args: &[&str]) -> Result<String, RuntimeError> {
    let out = Command::new(tool(prog))
        .args(args)
        .output()
        .map_err(|e| RuntimeError::Io(format!("run {prog}"), e))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(RuntimeError::Invalid(format!(
            "{prog} {}: {}",
            args.join(" "),
            err.lines().last().unwrap_or("failed").trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn json(prog: &str, args: &[&str]) -> Result<Vec<serde_json::Value>, RuntimeError> {
    let out = run(prog, args)?;
    serde_json::from_str(&out)
        .map_err(|e| RuntimeError::Invalid(format!("{prog} {}: output: {e}", args.join(" "))))
}

/// Reads the interfaces and routes of the current namespace; `lo` and
/// interfaces that are not Ethernet stay behind.
pub fn discover() -> Result<HostNetwork, RuntimeError> {
    let mut net = HostNetwork::default();
    for i in json("ip", &["-j", "addr", "show"])? {
        let name = i["ifname"].as_str().unwrap_or_default();
        if i["link_type"] != "ether" || name.is_empty() {
            continue;
        }
        let addresses = i["addr_info"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["family"] == "inet")
            .filter_map(|a| {
                Some(format!(
                    "{}/{}",
                    a["local"].as_str()?,
                    a["prefixlen"].as_u64()?
                ))
            })
            .collect();
        net.links.push(Link {
            veth: name.to_string(),
            tap: format!("husktap{}", net.links.len()),
            mac: i["address"].as_str().unwrap_or_default().to_string(),
            mtu: i["mtu"].as_u64().unwrap_or(1500) as u32,
            addresses,
        });
    }
    if net.links.is_empty() {
        return Ok(net);
    }
    for r in json("ip", &["-j", "-4", "route", "show", "table", "main"])? {
        let (Some(dst), Some(dev)) = (r["dst"].as_str(), r["dev"].as_str()) else {
            continue;
        };
        if r["protocol"] == "kernel" || !net.links.iter().any(|l| l.veth == dev) {
            continue;
        }
        let destination = if dst == "default" || dst.contains('/') {
            dst.to_string()
        } else {
            format!("{dst}/32")
        };
        net.routes.push(Route {
            destination,
            gateway: r["gateway"].as_str().map(str::to_string),
            device: dev.to_string(),
        });
    }
    Ok(net)
}

impl HostNetwork {
    /// The VM's NICs, in link order (eth0 first).
    pub fn nics(&self) -> Result<Vec<NetConfig>, RuntimeError> {
        self.links
            .iter()
            .map(|l| {
                format!("tap={},mac={}", l.tap, l.mac)
                    .parse()
                    .map_err(|e: String| {
                        RuntimeError::Invalid(format!("interface {}: {e}", l.veth))
                    })
            })
            .collect()
    }

    /// What the agent configures in the guest; `restored`: the VM came
    /// from a template, whose NICs have the template's MACs.
    pub fn guest(&self, restored: bool) -> Network {
        Network {
            interfaces: self
                .links
                .iter()
                .enumerate()
                .map(|(i, l)| Interface {
                    mac: l.mac.clone(),
                    device_mac: restored.then(|| crate::template::nic_mac(i)),
                    name: l.veth.clone(),
                    mtu: Some(l.mtu),
                    addresses: l.addresses.clone(),
                })
                .collect(),
            routes: self.routes.clone(),
        }
    }

    /// Joins each tap (made by the VMM) to its veth, both ways.
    pub fn connect(&self) -> Result<(), RuntimeError> {
        for l in &self.links {
            let mtu = l.mtu.to_string();
            run("ip", &["link", "set", "dev", &l.tap, "mtu", &mtu, "up"])?;
            for (from, to) in [(&l.veth, &l.tap), (&l.tap, &l.veth)] {
                run("tc", &["qdisc", "add", "dev", from, "ingress"])?;
                run(
                    "tc",
                    &[
                        "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32",
                        "match", "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev",
                        to,
                    ],
                )?;
            }
        }
        Ok(())
    }
}

/// Removes what [`HostNetwork::connect`] left on the veths of namespace
/// `path` (the taps went with the VMM process). Runs in a child that joins
/// the namespace, so the caller's stays as it is.
pub fn disconnect(path: &Path, net: &HostNetwork) -> Result<(), RuntimeError> {
    if net.links.is_empty() {
        return Ok(());
    }
    let ns = path.to_string_lossy();
    for l in &net.links {
        // `ip netns exec` would remount /sys; nsenter only joins.
        let _ = run(
            "nsenter",
            &[
                &format!("--net={ns}"),
                "tc",
                "qdisc",
                "del",
                "dev",
                &l.veth,
                "ingress",
            ],
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(ns: serde_json::Value) -> oci_spec::runtime::Spec {
        serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2", "linux": {"namespaces": ns}
        }))
        .unwrap()
    }

    #[test]
    fn the_namespace_the_config_names() {
        assert_eq!(
            Netns::of(&spec(serde_json::json!([{"type": "pid"}]))),
            Netns::Host
        );
        assert_eq!(
            Netns::of(&spec(serde_json::json!([{"type": "network"}]))),
            Netns::New
        );
        assert_eq!(
            Netns::of(&spec(
                serde_json::json!([{"type": "network", "path": "/run/netns/x"}])
            )),
            Netns::Path("/run/netns/x".into())
        );
    }

    #[test]
    fn guest_view_and_nics() {
        let net = HostNetwork {
            links: vec![Link {
                veth: "eth0".into(),
                tap: "husktap0".into(),
                mac: "02:42:ac:11:00:02".into(),
                mtu: 1500,
                addresses: vec!["172.17.0.2/16".into()],
            }],
            routes: vec![Route {
                destination: "default".into(),
                gateway: Some("172.17.0.1".into()),
                device: "eth0".into(),
            }],
        };
        let nics = net.nics().unwrap();
        assert_eq!(nics[0].tap, "husktap0");
        let g = net.guest(false);
        assert_eq!(g.interfaces[0].name, "eth0");
        assert_eq!(g.interfaces[0].device_mac, None);
        let g = net.guest(true);
        assert_eq!(
            g.interfaces[0].device_mac.as_deref(),
            Some("02:68:75:73:6b:00")
        );
        assert_eq!(g.routes.len(), 1);
    }
}
