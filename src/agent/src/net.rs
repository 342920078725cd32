//! The guest's network interfaces: bringing `lo` up, and the host's
//! [`Network`] (interfaces found by MAC, IPv4 addresses, MTU, routes) set
//! with the classic socket ioctls, which need no netlink code.

use std::io;
use std::mem;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use husk_proto::{Interface, Network, Route};

/// `struct rtentry` of `<net/route.h>` (x86_64 layout), declared here
/// because the libc crate only has it for some C libraries.
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_tos: libc::c_uchar,
    rt_class: libc::c_uchar,
    rt_pad4: [libc::c_short; 3],
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// An AF_INET datagram socket, the handle the ioctls take.
fn socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned right below.
    let fd = cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether `name` is a name the kernel accepts for an interface.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name.bytes().any(|b| b == b'/' || b == b':' || b <= b' ')
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain data; zero is a valid initial value.
    let mut req: libc::ifreq = unsafe { mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes) and
    // sockaddr is plain data.
    unsafe { mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// Sets or clears `IFF_UP` on interface `name`.
fn set_up(sock: &OwnedFd, name: &str, up: bool) -> io::Result<()> {
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFFLAGS fills the valid `req`.
    cvt(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) })?;
    let flag = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: the union field was set by SIOCGIFFLAGS above.
    unsafe {
        if up {
            req.ifr_ifru.ifru_flags |= flag
        } else {
            req.ifr_ifru.ifru_flags &= !flag
        }
    };
    // SAFETY: SIOCSIFFLAGS reads the valid `req`.
    cvt(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) })?;
    Ok(())
}

/// Sets `IFF_UP` on a network interface (e.g. `lo`).
pub fn interface_up(name: &str) -> io::Result<()> {
    set_up(&socket()?, name, true)
}

/// Parses `a.b.c.d/len`.
fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u32), String> {
    let (a, len) = s.split_once('/').unwrap_or((s, "32"));
    let addr: Ipv4Addr = a
        .parse()
        .map_err(|_| format!("{s:?}: not an IPv4 address"))?;
    match len.parse::<u32>() {
        Ok(l) if l <= 32 => Ok((addr, l)),
        _ => Err(format!("{s:?}: bad prefix length")),
    }
}

fn netmask(len: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::MAX.checked_shl(32 - len).unwrap_or(0))
}

/// The name of the interface whose MAC address is `mac`.
fn find_by_mac(sys_class_net: &Path, mac: &str) -> Result<String, String> {
    let entries = std::fs::read_dir(sys_class_net)
        .map_err(|e| format!("{}: {e}", sys_class_net.display()))?;
    for e in entries.flatten() {
        let addr = std::fs::read_to_string(e.path().join("address")).unwrap_or_default();
        if addr.trim().eq_ignore_ascii_case(mac) {
            return Ok(e.file_name().to_string_lossy().into_owned());
        }
    }
    Err(format!("no interface has MAC address {mac}"))
}

/// Parses `aa:bb:cc:dd:ee:ff`: a unicast address (the kernel refuses
/// others for an interface).
fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bad = || format!("MAC address {s:?} is not valid");
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in out.iter_mut() {
        let p = parts.next().filter(|p| p.len() == 2).ok_or_else(bad)?;
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() || out[0] & 1 != 0 || out == [0; 6] {
        return Err(bad());
    }
    Ok(out)
}

fn zeroed_sockaddr() -> libc::sockaddr {
    // SAFETY: sockaddr is plain data; zero is a valid value.
    unsafe { mem::zeroed() }
}

fn ioctl_name(
    sock: &OwnedFd,
    name: &str,
    request: libc::c_ulong,
    what: &str,
    req: &libc::ifreq,
) -> Result<(), String> {
    // SAFETY: `req` is a valid ifreq filled for `request`, which only reads it.
    cvt(unsafe { libc::ioctl(sock.as_raw_fd(), request, req) })
        .map(drop)
        .map_err(|e| format!("{name}: {what}: {e}"))
}

fn configure_interface(sock: &OwnedFd, i: &Interface) -> Result<(), String> {
    if !valid_name(&i.name) {
        return Err(format!("interface name {:?} is not valid", i.name));
    }
    if i.addresses.len() > 16 {
        return Err(format!("{}: more than 16 addresses", i.name));
    }
    let device_mac = i.device_mac.as_deref().unwrap_or(&i.mac);
    let current = find_by_mac(Path::new("/sys/class/net"), device_mac)?;
    set_up(sock, &current, false).map_err(|e| format!("{current}: down: {e}"))?;
    if !device_mac.eq_ignore_ascii_case(&i.mac) {
        let mut req = ifreq(&current).map_err(|e| format!("{current}: {e}"))?;
        let mut hw: libc::sockaddr = zeroed_sockaddr();
        hw.sa_family = libc::ARPHRD_ETHER;
        for (dst, src) in hw.sa_data.iter_mut().zip(parse_mac(&i.mac)?) {
            *dst = src as libc::c_char;
        }
        req.ifr_ifru.ifru_hwaddr = hw;
        ioctl_name(sock, &current, libc::SIOCSIFHWADDR, "set MAC address", &req)?;
    }
    if current != i.name {
        let mut req = ifreq(&current).map_err(|e| format!("{current}: {e}"))?;
        // SAFETY: writing the union's newname field of a zeroed ifreq.
        let newname = unsafe { &mut req.ifr_ifru.ifru_newname };
        for (dst, src) in newname.iter_mut().zip(i.name.bytes()) {
            *dst = src as libc::c_char;
        }
        ioctl_name(sock, &current, libc::SIOCSIFNAME, "rename", &req)?;
    }
    let name = &i.name;
    if let Some(mtu) = i.mtu {
        let mut req = ifreq(name).map_err(|e| format!("{name}: {e}"))?;
        req.ifr_ifru.ifru_mtu = i32::try_from(mtu).map_err(|_| format!("{name}: MTU {mtu}"))?;
        ioctl_name(sock, name, libc::SIOCSIFMTU, "set MTU", &req)?;
    }
    for (n, a) in i.addresses.iter().enumerate() {
        let (addr, len) = parse_cidr(a)?;
        // Extra addresses go on aliases (`eth0:1`), the ioctl way.
        let label = if n == 0 {
            name.clone()
        } else {
            format!("{name}:{n}")
        };
        let mut req = ifreq(&label).map_err(|e| format!("{label}: {e}"))?;
        req.ifr_ifru.ifru_addr = sockaddr_in(addr);
        ioctl_name(sock, &label, libc::SIOCSIFADDR, "set address", &req)?;
        req.ifr_ifru.ifru_netmask = sockaddr_in(netmask(len));
        ioctl_name(sock, &label, libc::SIOCSIFNETMASK, "set netmask", &req)?;
    }
    set_up(sock, name, true).map_err(|e| format!("{name}: up: {e}"))
}

fn add_route(sock: &OwnedFd, r: &Route) -> Result<(), String> {
    if !valid_name(&r.device) {
        return Err(format!("route device {:?} is not valid", r.device));
    }
    let (dst, len) = if r.destination == "default" {
        (Ipv4Addr::UNSPECIFIED, 0)
    } else {
        parse_cidr(&r.destination)?
    };
    let mut dev = std::ffi::CString::new(r.device.as_str())
        .map_err(|_| format!("route device {:?} is not valid", r.device))?
        .into_bytes_with_nul();
    // SAFETY: RtEntry is plain data (the pointer is set below); zero is valid.
    let mut rt: RtEntry = unsafe { mem::zeroed() };
    rt.rt_dst = sockaddr_in(dst);
    rt.rt_genmask = sockaddr_in(netmask(len));
    rt.rt_flags = libc::RTF_UP;
    if len == 32 {
        rt.rt_flags |= libc::RTF_HOST;
    }
    if let Some(gw) = &r.gateway {
        let gw: Ipv4Addr = gw
            .parse()
            .map_err(|_| format!("route gateway {gw:?}: not an IPv4 address"))?;
        rt.rt_gateway = sockaddr_in(gw);
        rt.rt_flags |= libc::RTF_GATEWAY;
    }
    rt.rt_dev = dev.as_mut_ptr().cast();
    // SAFETY: `rt` is a valid rtentry whose rt_dev points at `dev`, a NUL
    // terminated name alive for the call.
    cvt(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCADDRT, &rt) })
        .map(drop)
        .map_err(|e| format!("route {} via {:?}: {e}", r.destination, r.gateway))
}

/// Applies the host's description of the guest's network.
pub fn configure(net: &Network) -> Result<(), String> {
    if net.interfaces.len() > 64 || net.routes.len() > 1024 {
        return Err("too many interfaces or routes".into());
    }
    let sock = socket().map_err(|e| format!("socket: {e}"))?;
    for i in &net.interfaces {
        configure_interface(&sock, i)?;
    }
    for r in &net.routes {
        add_route(&sock, r)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_and_masks() {
        assert_eq!(
            parse_cidr("172.17.0.2/16").unwrap(),
            ("172.17.0.2".parse().unwrap(), 16)
        );
        assert_eq!(parse_cidr("10.0.0.1").unwrap().1, 32);
        assert!(parse_cidr("10.0.0.1/33").is_err());
        assert!(parse_cidr("fe80::1/64").is_err());
        assert_eq!(netmask(16), Ipv4Addr::new(255, 255, 0, 0));
        assert_eq!(netmask(0), Ipv4Addr::UNSPECIFIED);
        assert_eq!(netmask(32), Ipv4Addr::BROADCAST);
        assert_eq!(mem::size_of::<RtEntry>(), 120);
    }

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("02:42:AC:11:00:02").unwrap(),
            [2, 0x42, 0xac, 0x11, 0, 2]
        );
        for bad in [
            "",
            "02:42:ac:11:00",
            "02:42:ac:11:00:02:03",
            "02:42:ac:11:0:02",
            "02:42:ac:11:00:zz",
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn names() {
        assert!(valid_name("eth0"));
        for bad in ["", "a/b", "eth0:1", "..", "sixteen-bytes-xx", "a b"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
