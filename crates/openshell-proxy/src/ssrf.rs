//! Which resolved addresses an allowed connection may reach.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use openshell_policy::IpNet;

/// The cloud metadata address.
pub const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// Why an address is refused without an `allowed_ips` entry covering it;
/// `None` for an ordinary public address.
pub fn special_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => special_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return special_v4(v4).or(Some("ipv4-mapped"));
            }
            special_v6(v6)
        }
    }
}

fn special_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip == METADATA {
        Some("cloud metadata")
    } else if ip.is_unspecified() || o[0] == 0 {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private (rfc1918)")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if o[0] == 100 && (o[1] & 0xC0) == 64 {
        Some("shared address space (100.64.0.0/10)")
    } else if ip.is_broadcast() {
        Some("broadcast")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if o[0] >= 240 {
        Some("reserved")
    } else if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        Some("ietf protocol assignments")
    } else if o[0] == 198 && (o[1] & 0xFE) == 18 {
        Some("benchmarking")
    } else {
        None
    }
}

fn special_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let seg = ip.segments();
    if ip.is_unspecified() {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if (seg[0] & 0xFE00) == 0xFC00 {
        Some("unique local (fc00::/7)")
    } else if (seg[0] & 0xFFC0) == 0xFE80 {
        Some("link-local")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if seg[0] == 0x64 && seg[1] == 0xFF9B {
        // NAT64: judge the embedded IPv4 address.
        let o = ip.octets();
        special_v4(Ipv4Addr::new(o[12], o[13], o[14], o[15]))
    } else if seg[0..6] == [0, 0, 0, 0, 0, 0] {
        Some("ipv4-compatible")
    } else {
        None
    }
}

/// Check one resolved address against the endpoint's `allowed_ips`. With
/// `allowed_ips` set, the address must lie in one of them (any range); without,
/// it must not be special. `Err` carries a reason for the deny answer.
pub fn check(ip: IpAddr, allowed_ips: &[IpNet]) -> Result<(), String> {
    let plain = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    };
    if !allowed_ips.is_empty() {
        if allowed_ips.iter().any(|net| net.contains(plain)) {
            return Ok(());
        }
        let nets: Vec<String> = allowed_ips.iter().map(ToString::to_string).collect();
        return Err(format!(
            "resolved address {plain} is outside the endpoint's allowed_ips [{}]",
            nets.join(", ")
        ));
    }
    match special_range(plain) {
        None => Ok(()),
        Some(kind) => Err(format!(
            "resolved address {plain} is {kind}, which is refused unless the endpoint's allowed_ips covers it"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    fn net(s: &str) -> IpNet {
        IpNet::try_from(s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn classifies_addresses() {
        let cases = [
            ("8.8.8.8", None),
            ("127.0.0.2", Some("loopback")),
            ("10.1.2.3", Some("private (rfc1918)")),
            ("172.16.0.1", Some("private (rfc1918)")),
            ("192.168.1.1", Some("private (rfc1918)")),
            ("169.254.169.254", Some("cloud metadata")),
            ("169.254.1.1", Some("link-local")),
            ("100.64.0.1", Some("shared address space (100.64.0.0/10)")),
            ("100.128.0.1", None),
            ("0.0.0.0", Some("unspecified")),
            ("224.0.0.1", Some("multicast")),
            ("255.255.255.255", Some("broadcast")),
            ("250.1.1.1", Some("reserved")),
            ("::1", Some("loopback")),
            ("::", Some("unspecified")),
            ("fd00::1", Some("unique local (fc00::/7)")),
            ("fe80::1", Some("link-local")),
            ("ff02::1", Some("multicast")),
            ("::ffff:127.0.0.1", Some("loopback")),
            ("64:ff9b::a9fe:a9fe", Some("cloud metadata")),
            ("2001:4860:4860::8888", None),
        ];
        for (addr, want) in cases {
            let ip: IpAddr = addr.parse().unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(special_range(ip), want, "{addr}");
        }
    }

    #[test]
    fn allowed_ips_override_and_restrict() {
        let lo: IpAddr = "127.0.0.2".parse().unwrap_or_else(|e| panic!("{e}"));
        let public: IpAddr = "8.8.8.8".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(check(lo, &[net("127.0.0.0/8")]), Ok(()));
        assert!(check(lo, &[]).is_err());
        assert_eq!(check(public, &[]), Ok(()));
        assert_eq!(
            check(public, &[net("127.0.0.0/8")]),
            Err(
                "resolved address 8.8.8.8 is outside the endpoint's allowed_ips [127.0.0.0/8]"
                    .into()
            )
        );
        let mapped: IpAddr = "::ffff:127.0.0.2".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(check(mapped, &[net("127.0.0.0/8")]), Ok(()));
    }
}
