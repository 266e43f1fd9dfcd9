//! Multicast group memberships of a socket, which no socket option lists: found by asking
//! the socket (MCAST_MSFILTER answers only for a member) about every group its network
//! namespace has joined, as /proc/PID/net/igmp and igmp6 list them. They cannot be given
//! back, so [`crate::sockopt::read`] refuses them.

use std::os::fd::RawFd;

const MCAST_MSFILTER: i32 = 48;
const IP: i32 = libc::IPPROTO_IP;
const IP6: i32 = libc::IPPROTO_IPV6;

/// Multicast groups the socket has joined, which cannot be given back: each group its
/// network namespace is in is asked about (MCAST_MSFILTER answers only for a member).
pub(crate) fn memberships(pid: i32, raw: RawFd, domain: i32) -> Vec<String> {
    let (file, level) = if domain == libc::AF_INET {
        ("igmp", IP)
    } else {
        ("igmp6", IP6)
    };
    // The groups of the process's network namespace (the socket's, as a rule).
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (ifindex, group) in groups(&text, domain) {
        // struct group_filter: u32 interface, (pad), sockaddr_storage group, u32 fmode,
        // u32 numsrc, then sources.
        let mut gf = [0u8; 8 + 128 + 8 + 128];
        gf[0..4].copy_from_slice(&ifindex.to_ne_bytes());
        gf[8..10].copy_from_slice(&(domain as u16).to_ne_bytes());
        if domain == libc::AF_INET {
            gf[12..16].copy_from_slice(&group[..4]);
        } else {
            gf[16..32].copy_from_slice(&group);
        }
        let mut len = gf.len() as libc::socklen_t;
        // SAFETY: getsockopt writes at most len bytes into a local buffer.
        let r = unsafe {
            libc::getsockopt(raw, level, MCAST_MSFILTER, gf.as_mut_ptr().cast(), &mut len)
        };
        if r == 0 {
            let addr = if domain == libc::AF_INET {
                std::net::Ipv4Addr::new(group[0], group[1], group[2], group[3]).to_string()
            } else {
                std::net::Ipv6Addr::from(group).to_string()
            };
            out.push(format!(
                "it is a member of multicast group {addr} (interface {ifindex}), which is \
                 not supported yet"
            ));
        }
    }
    out
}

/// (interface index, group address bytes) of /proc/net/igmp or igmp6.
fn groups(text: &str, domain: i32) -> Vec<(u32, [u8; 16])> {
    let mut out = Vec::new();
    let mut index = 0u32;
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if domain == libc::AF_INET6 {
            // "1 lo ff020000000000000000000000000001 1 0000000C 0"
            if let (Some(i), Some(g)) = (fields.first(), fields.get(2)) {
                if let (Ok(i), true) = (i.parse::<u32>(), g.len() == 32) {
                    let mut a = [0u8; 16];
                    for (k, b) in a.iter_mut().enumerate() {
                        *b = u8::from_str_radix(&g[2 * k..2 * k + 2], 16).unwrap_or(0);
                    }
                    out.push((i, a));
                }
            }
            continue;
        }
        if !line.starts_with(char::is_whitespace) {
            // "1\tlo        :     1      V3": an interface.
            index = fields.first().and_then(|i| i.parse().ok()).unwrap_or(0);
        } else if let Some(g) = fields.first().filter(|g| g.len() == 8) {
            // "\t\t\t\t010000E0     1 0:00000000\t\t0": the address as the kernel stores
            // it, printed as a native integer.
            if let Ok(v) = u32::from_str_radix(g, 16) {
                let mut a = [0u8; 16];
                a[..4].copy_from_slice(&v.to_ne_bytes());
                out.push((index, a));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn igmp_lines_give_interface_and_group() {
        let text = "Idx\tDevice    : Count Querier\tGroup    Users Timer\tReporter\n\
                    1\tlo        :     1      V3\n\t\t\t\t010000E0     1 0:00000000\t\t0\n";
        let g = groups(text, libc::AF_INET);
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].0, 1);
        assert_eq!(&g[0].1[..4], &0x010000E0u32.to_ne_bytes());
    }
}
