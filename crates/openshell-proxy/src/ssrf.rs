//! Which resolved addresses an allowed connection may reach: special-purpose ranges
//! (IANA's registries) and the host's own addresses are refused unless the endpoint's
//! `allowed_ips` covers them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use openshell_policy::IpNet;

/// The cloud metadata address.
pub const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// Why an address is refused without an `allowed_ips` entry covering it;
/// `None` for an ordinary public address. IPv6 addresses that embed an IPv4 address
/// (mapped, compatible, translated, NAT64, 6to4) are judged by that IPv4 address.
pub fn special_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => special_v4(v4),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => special_v4(v4),
            None => special_v6(v6),
        },
    }
}

/// `(first address as u32, prefix length, class)`.
const V4_RANGES: &[([u8; 4], u8, &str)] = &[
    ([0, 0, 0, 0], 8, "unspecified (0.0.0.0/8)"),
    ([10, 0, 0, 0], 8, "private (rfc1918)"),
    ([100, 64, 0, 0], 10, "shared address space (100.64.0.0/10)"),
    ([127, 0, 0, 0], 8, "loopback"),
    ([169, 254, 0, 0], 16, "link-local"),
    ([172, 16, 0, 0], 12, "private (rfc1918)"),
    (
        [192, 0, 0, 0],
        24,
        "ietf protocol assignments (192.0.0.0/24)",
    ),
    ([192, 0, 2, 0], 24, "documentation (192.0.2.0/24)"),
    ([192, 88, 99, 0], 24, "6to4 relay anycast (192.88.99.0/24)"),
    ([192, 168, 0, 0], 16, "private (rfc1918)"),
    ([198, 18, 0, 0], 15, "benchmarking (198.18.0.0/15)"),
    ([198, 51, 100, 0], 24, "documentation (198.51.100.0/24)"),
    ([203, 0, 113, 0], 24, "documentation (203.0.113.0/24)"),
    ([224, 0, 0, 0], 4, "multicast"),
    ([255, 255, 255, 255], 32, "broadcast"),
    ([240, 0, 0, 0], 4, "reserved (240.0.0.0/4)"),
];

fn special_v4(ip: Ipv4Addr) -> Option<&'static str> {
    if ip == METADATA {
        return Some("cloud metadata");
    }
    let value = u32::from(ip);
    V4_RANGES.iter().find_map(|(net, len, class)| {
        let mask = u32::MAX.checked_shl(32 - u32::from(*len)).unwrap_or(0);
        (value & mask == u32::from(Ipv4Addr::from(*net)) & mask).then_some(*class)
    })
}

/// The IPv4 address an IPv6 address stands for, where it embeds one: IPv4-mapped
/// (`::ffff:0:0/96`), IPv4-compatible (`::/96`, but not `::` and `::1`), IPv4-translated
/// (`::ffff:0:0:0/96`), the NAT64 well-known prefix (`64:ff9b::/96`) and 6to4 (`2002::/16`).
pub fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let o = ip.octets();
    let tail = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    if s[..6] == [0, 0, 0, 0, 0, 0] && !ip.is_unspecified() && !ip.is_loopback() {
        return Some(tail);
    }
    if s[..6] == [0, 0, 0, 0, 0xffff, 0] || s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(tail);
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    None
}

/// `(prefix, prefix length, class)`, most specific first where they nest.
const V6_RANGES: &[([u16; 8], u8, &str)] = &[
    ([0, 0, 0, 0, 0, 0, 0, 0], 128, "unspecified"),
    ([0, 0, 0, 0, 0, 0, 0, 1], 128, "loopback"),
    (
        [0x64, 0xff9b, 1, 0, 0, 0, 0, 0],
        48,
        "local-use NAT64 (64:ff9b:1::/48)",
    ),
    ([0x100, 0, 0, 0, 0, 0, 0, 0], 64, "discard-only (100::/64)"),
    (
        [0x2001, 0xdb8, 0, 0, 0, 0, 0, 0],
        32,
        "documentation (2001:db8::/32)",
    ),
    (
        [0x2001, 0, 0, 0, 0, 0, 0, 0],
        23,
        "ietf protocol assignments (2001::/23: teredo, benchmarking, orchid)",
    ),
    (
        [0x3fff, 0, 0, 0, 0, 0, 0, 0],
        20,
        "documentation (3fff::/20)",
    ),
    (
        [0x5f00, 0, 0, 0, 0, 0, 0, 0],
        16,
        "segment routing (5f00::/16)",
    ),
    ([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7, "unique local (fc00::/7)"),
    ([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10, "link-local"),
    ([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10, "site-local (fec0::/10)"),
    ([0xff00, 0, 0, 0, 0, 0, 0, 0], 8, "multicast"),
];

fn special_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let value = u128::from(ip);
    V6_RANGES.iter().find_map(|(net, len, class)| {
        let mask = u128::MAX.checked_shl(128 - u32::from(*len)).unwrap_or(0);
        (value & mask == u128::from(Ipv6Addr::from(*net)) & mask).then_some(*class)
    })
}

/// Check one resolved address against the endpoint's `allowed_ips`, without the host's own
/// addresses (see [`check_with`]).
pub fn check(ip: IpAddr, allowed_ips: &[IpNet]) -> Result<(), String> {
    check_with(ip, allowed_ips, &[])
}

/// Check one resolved address. With `allowed_ips` set, the address must lie in one of them
/// (any range); without, it must be neither special ([`special_range`]) nor one of the
/// host's own addresses (`own`). An IPv6 address embedding an IPv4 address is judged as
/// that IPv4 address. `Err` carries a reason for the deny answer.
pub fn check_with(ip: IpAddr, allowed_ips: &[IpNet], own: &[IpAddr]) -> Result<(), String> {
    let plain = match ip {
        IpAddr::V6(v6) => embedded_v4(v6).map_or(ip, IpAddr::V4),
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
    let kind = special_range(plain).or_else(|| {
        own.iter()
            .any(|a| *a == plain || *a == ip)
            .then_some("one of this host's own addresses")
    });
    match kind {
        None => Ok(()),
        Some(kind) => Err(format!(
            "resolved address {plain} is {kind}, which is refused unless the endpoint's allowed_ips covers it"
        )),
    }
}

/// A listener of the supervisor's own (the approval endpoint, the SSH server): no connection
/// of a sandbox reaches it, whatever an endpoint's `allowed_ips` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reserved {
    /// What listens there, for the deny reason (`the approval endpoint`).
    pub what: String,
    /// The address it is bound to.
    pub addr: SocketAddr,
}

/// The reserved listener `dest` would reach, if any. A connection to a local address
/// (loopback, unspecified, one of the host's own `own`, or the listener's own) on a
/// reserved listener's port is taken to reach it: which local address a listener answers on
/// depends on how it was bound, so every local address is refused on that port rather than
/// guessed. IPv6 addresses embedding an IPv4 address count as that address.
pub fn reserved<'a>(
    dest: SocketAddr,
    reserved: &'a [Reserved],
    own: &[IpAddr],
) -> Option<&'a Reserved> {
    let plain = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => embedded_v4(v6).map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    };
    let ip = plain(dest.ip());
    let local = ip.is_loopback() || ip.is_unspecified() || own.iter().any(|a| plain(*a) == ip);
    reserved
        .iter()
        .find(|r| r.addr.port() == dest.port() && (local || plain(r.addr.ip()) == ip))
}

/// The host's own interface addresses, read when the proxy starts and again whenever the
/// kernel reports an address change (rtnetlink's IPv4/IPv6 address groups).
#[derive(Debug, Clone)]
pub struct HostAddresses {
    current: Arc<std::sync::OnceLock<Receiver>>,
}

type Receiver = tokio::sync::watch::Receiver<Option<Arc<Vec<IpAddr>>>>;

/// How long a decision waits for the first reading of the host's addresses.
const FIRST_READING: std::time::Duration = std::time::Duration::from_secs(5);

impl HostAddresses {
    /// A fixed list (tests).
    pub fn fixed(addresses: Vec<IpAddr>) -> Self {
        let (_tx, rx) = tokio::sync::watch::channel(Some(Arc::new(addresses)));
        let current = std::sync::OnceLock::new();
        let _ = current.set(rx);
        Self {
            current: Arc::new(current),
        }
    }

    /// Start reading on the current tokio runtime, or, without one, on the first use (which
    /// is on a runtime).
    pub fn watch() -> Self {
        let this = Self {
            current: Arc::new(std::sync::OnceLock::new()),
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            this.receiver();
        }
        this
    }

    fn receiver(&self) -> Receiver {
        self.current
            .get_or_init(|| {
                let (tx, rx) = tokio::sync::watch::channel(None);
                tokio::spawn(follow(tx));
                rx
            })
            .clone()
    }

    /// The addresses; `Err` when they are not known (yet), which refuses the destination.
    /// Must be called on a tokio runtime.
    pub async fn current(&self) -> Result<Arc<Vec<IpAddr>>, String> {
        let mut rx = self.receiver();
        let known = tokio::time::timeout(FIRST_READING, rx.wait_for(Option::is_some)).await;
        match known {
            Ok(Ok(guard)) => guard
                .clone()
                .ok_or_else(|| "host addresses unknown".to_string()),
            _ => Err("the proxy does not know this host's own addresses".to_string()),
        }
    }
}

async fn follow(tx: tokio::sync::watch::Sender<Option<Arc<Vec<IpAddr>>>>) {
    use futures::StreamExt;
    use rtnetlink::MulticastGroup;
    let (connection, handle, mut changes) = match rtnetlink::new_multicast_connection(&[
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv6Ifaddr,
    ]) {
        Ok(c) => c,
        Err(error) => {
            tracing::error!(target: "openshell::proxy", %error, "cannot watch the host's addresses; destinations without allowed_ips are refused");
            return;
        }
    };
    tokio::spawn(connection);
    loop {
        let mut addresses = Vec::new();
        let mut listing = handle.address().get().execute();
        let mut failed = false;
        while let Some(message) = listing.next().await {
            match message {
                Ok(message) => {
                    for attribute in message.attributes {
                        if let rtnetlink::packet_route::address::AddressAttribute::Address(ip)
                        | rtnetlink::packet_route::address::AddressAttribute::Local(ip) =
                            attribute
                        {
                            if !addresses.contains(&ip) {
                                addresses.push(ip);
                            }
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(target: "openshell::proxy", %error, "reading the host's addresses");
                    failed = true;
                    break;
                }
            }
        }
        if !failed {
            tracing::debug!(target: "openshell::proxy", ?addresses, "host addresses");
            if tx.send(Some(Arc::new(addresses))).is_err() {
                return;
            }
        }
        // Wait for a change (and take every queued one: one reading covers them).
        if changes.next().await.is_none() {
            return;
        }
        while let Ok(Some(_)) =
            tokio::time::timeout(std::time::Duration::from_millis(20), changes.next()).await
        {
        }
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
            ("0.0.0.0", Some("unspecified (0.0.0.0/8)")),
            ("0.1.2.3", Some("unspecified (0.0.0.0/8)")),
            ("224.0.0.1", Some("multicast")),
            ("255.255.255.255", Some("broadcast")),
            ("250.1.1.1", Some("reserved (240.0.0.0/4)")),
            (
                "192.0.0.170",
                Some("ietf protocol assignments (192.0.0.0/24)"),
            ),
            ("192.0.2.1", Some("documentation (192.0.2.0/24)")),
            ("192.88.99.1", Some("6to4 relay anycast (192.88.99.0/24)")),
            ("198.19.255.1", Some("benchmarking (198.18.0.0/15)")),
            ("198.20.0.1", None),
            ("198.51.100.7", Some("documentation (198.51.100.0/24)")),
            ("203.0.113.9", Some("documentation (203.0.113.0/24)")),
            ("203.0.114.9", None),
            ("::1", Some("loopback")),
            ("::", Some("unspecified")),
            ("fd00::1", Some("unique local (fc00::/7)")),
            ("fd00:ec2::254", Some("unique local (fc00::/7)")),
            ("fe80::1", Some("link-local")),
            ("fec0::1", Some("site-local (fec0::/10)")),
            ("ff02::1", Some("multicast")),
            ("::ffff:127.0.0.1", Some("loopback")),
            ("::ffff:8.8.8.8", None),
            ("::127.0.0.1", Some("loopback")),
            ("::10.0.0.1", Some("private (rfc1918)")),
            ("::ffff:0:10.0.0.1", Some("private (rfc1918)")),
            ("64:ff9b::a9fe:a9fe", Some("cloud metadata")),
            ("64:ff9b::808:808", None),
            ("64:ff9b:1::a00:1", Some("local-use NAT64 (64:ff9b:1::/48)")),
            ("2002:a00:1::1", Some("private (rfc1918)")),
            ("2002:7f00:1::", Some("loopback")),
            ("2002:808:808::1", None),
            ("100::1", Some("discard-only (100::/64)")),
            ("2001:db8::1", Some("documentation (2001:db8::/32)")),
            ("3fff::1", Some("documentation (3fff::/20)")),
            (
                "2001::1",
                Some("ietf protocol assignments (2001::/23: teredo, benchmarking, orchid)"),
            ),
            (
                "2001:2::1",
                Some("ietf protocol assignments (2001::/23: teredo, benchmarking, orchid)"),
            ),
            ("5f00::1", Some("segment routing (5f00::/16)")),
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

    #[test]
    fn the_hosts_own_addresses_are_refused() {
        let own: Vec<IpAddr> = vec!["203.0.114.5".parse().unwrap_or_else(|e| panic!("{e}"))];
        let ip: IpAddr = "203.0.114.5".parse().unwrap_or_else(|e| panic!("{e}"));
        let mapped: IpAddr = "::ffff:203.0.114.5"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        let other: IpAddr = "203.0.114.6".parse().unwrap_or_else(|e| panic!("{e}"));
        let refused = Err("resolved address 203.0.114.5 is one of this host's own addresses, which is refused unless the endpoint's allowed_ips covers it".to_string());
        assert_eq!(check_with(ip, &[], &own), refused);
        assert_eq!(check_with(mapped, &[], &own), refused);
        assert_eq!(check_with(other, &[], &own), Ok(()));
        assert_eq!(check_with(ip, &[net("203.0.114.0/24")], &own), Ok(()));
    }

    #[test]
    fn the_supervisors_own_listeners_are_reserved_on_every_local_address() {
        let addr = |s: &str| -> SocketAddr { s.parse().unwrap_or_else(|e| panic!("{s}: {e}")) };
        let listeners = [Reserved {
            what: "the approval endpoint".into(),
            addr: addr("127.0.0.1:7000"),
        }];
        let own: Vec<IpAddr> = vec!["203.0.114.5".parse().unwrap_or_else(|e| panic!("{e}"))];
        let hit = |dest: &str| reserved(addr(dest), &listeners, &own).map(|r| r.what.clone());
        let approval = Some("the approval endpoint".to_string());
        for dest in [
            "127.0.0.1:7000",
            "127.0.0.2:7000",
            "0.0.0.0:7000",
            "[::1]:7000",
            "[::]:7000",
            "[::ffff:127.0.0.1]:7000",
            "203.0.114.5:7000",
            "[::ffff:203.0.114.5]:7000",
        ] {
            assert_eq!((dest, hit(dest)), (dest, approval.clone()));
        }
        for dest in ["127.0.0.1:7001", "203.0.114.6:7000", "8.8.8.8:7000"] {
            assert_eq!((dest, hit(dest)), (dest, None));
        }
    }

    #[tokio::test]
    async fn host_addresses_are_read() {
        let addresses = HostAddresses::watch()
            .current()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let lo: IpAddr = "127.0.0.1".parse().unwrap_or_else(|e| panic!("{e}"));
        assert!(addresses.contains(&lo), "{addresses:?}");
    }
}
