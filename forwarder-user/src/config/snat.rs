//! `kernel.snat_addresses`: the addresses new kernel flows may leave from,
//! as a list of addresses and prefixes, expanded and checked here. That
//! the host owns them is checked where the kernel path starts or reloads.

use std::net::{IpAddr, Ipv4Addr};

use super::errors::{ConfigError, quoted};
use super::values;
use super::yaml::Node;

/// Most addresses in all; the kernel's pool holds as many.
pub const MAX_ADDRS: usize = forwarder_common::snat::MAX_SNAT_ADDRS as usize;

const ALLOWED: &str = "IPv4 addresses or prefixes this host owns (e.g. `[10.1.0.10, 10.1.0.11]` \
                       or `10.1.0.8/29`), 256 addresses at most in all";

/// The addresses of `node`, in the order written, each prefix expanded
/// (every address of it, from the lowest). Errors name the item.
pub fn parse(node: &Node) -> Result<Vec<Ipv4Addr>, Vec<ConfigError>> {
    let items = values::list(node, true, ALLOWED).map_err(|e| vec![e])?;
    let mut out: Vec<Ipv4Addr> = Vec::new();
    let mut errors = Vec::new();
    for item in items {
        match expand(&item) {
            Ok(addrs) => {
                for a in addrs {
                    if out.contains(&a) {
                        errors.push(ConfigError::new(
                            &item.pos,
                            format!("{a} twice"),
                            "each address once (prefixes must not overlap)",
                        ));
                        break;
                    }
                    out.push(a);
                    if out.len() > MAX_ADDRS {
                        errors.push(ConfigError::new(
                            &item.pos,
                            format!("more than {MAX_ADDRS} addresses in all"),
                            ALLOWED,
                        ));
                        return Err(errors);
                    }
                }
            }
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// One item: an address, or a prefix as its addresses.
fn expand(item: &Node) -> Result<Vec<Ipv4Addr>, ConfigError> {
    let text = item.as_str().unwrap_or("").trim().to_owned();
    let cidr = values::cidr(item).map_err(|e| {
        let allowed = ALLOWED.to_owned();
        ConfigError { allowed, ..e }
    })?;
    let IpAddr::V4(network) = cidr.addr else {
        return Err(ConfigError::new(
            &item.pos,
            format!("{} (IPv6)", quoted(&text)),
            "IPv4: the kernel path SNATs IPv4 flows only",
        ));
    };
    if cidr.prefix < 24 {
        return Err(ConfigError::new(
            &item.pos,
            format!(
                "{} ({} addresses)",
                quoted(&text),
                1u64 << (32 - cidr.prefix)
            ),
            "a prefix of /24 or longer (256 addresses at most in all)",
        ));
    }
    let count = 1u32 << (32 - cidr.prefix);
    let first = u32::from(network);
    let addrs: Vec<Ipv4Addr> = (0..count).map(|i| Ipv4Addr::from(first + i)).collect();
    if let Some(bad) = addrs.iter().find(|a| !usable(a)) {
        return Err(ConfigError::new(
            &item.pos,
            format!("{} ({bad} is not a unicast address)", quoted(&text)),
            "unicast addresses: not 0.0.0.0/8, loopback, multicast or broadcast",
        ));
    }
    Ok(addrs)
}

fn usable(a: &Ipv4Addr) -> bool {
    !(a.octets()[0] == 0 || a.is_loopback() || a.is_multicast() || a.is_broadcast())
}

/// `10.1.0.8-10.1.0.15` style runs for `check` and `status`: consecutive
/// addresses in one item.
pub fn describe(addrs: &[Ipv4Addr]) -> String {
    if addrs.is_empty() {
        return "none (each backend's route address)".to_owned();
    }
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < addrs.len() {
        let mut j = i;
        while j + 1 < addrs.len() && u32::from(addrs[j + 1]) == u32::from(addrs[j]).wrapping_add(1)
        {
            j += 1;
        }
        if j == i {
            out.push(addrs[i].to_string());
        } else {
            out.push(format!("{}-{}", addrs[i], addrs[j]));
        }
        i = j + 1;
    }
    out.join(", ")
}

#[cfg(test)]
mod tests {
    use super::super::tests::{errors, load};
    use super::*;

    fn addrs(value: &str) -> Vec<Ipv4Addr> {
        let text = format!("kernel: {{snat_addresses: {value}}}\n");
        load(&text).unwrap().0.kernel_settings.snat_addresses
    }

    fn refused(value: &str) -> String {
        let text = format!("kernel: {{snat_addresses: {value}}}\n");
        let got = errors(&text);
        assert_eq!(got.len(), 1, "{got:?}");
        got[0].clone()
    }

    #[test]
    fn addresses_and_prefixes_expand_in_order() {
        let a = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(
            addrs("[10.1.0.10, 10.1.0.11]"),
            [a("10.1.0.10"), a("10.1.0.11")]
        );
        let p = addrs("10.1.0.8/29");
        assert_eq!(p.len(), 8);
        assert_eq!((p[0], p[7]), (a("10.1.0.8"), a("10.1.0.15")));
        assert_eq!(
            addrs("'192.0.2.7, 10.1.0.4/31'"),
            [a("192.0.2.7"), a("10.1.0.4"), a("10.1.0.5")]
        );
        assert_eq!(addrs("10.2.0.0/24").len(), 256);
        assert!(addrs("[]").is_empty());
        assert!(
            load("routes: {}\n")
                .unwrap()
                .0
                .kernel_settings
                .snat_addresses
                .is_empty()
        );
    }

    #[test]
    fn bad_lists_are_refused_with_what_and_where() {
        let e = refused("[10.1.0.1, bogus]");
        assert!(
            e.starts_with(
                "test.yaml:1:37: `kernel.snat_addresses`: found `bogus`; allowed IPv4 addresses or prefixes this host owns"
            ),
            "{e}"
        );
        let e = refused("10.0.0.0/23");
        assert!(
            e.contains("found `10.0.0.0/23` (512 addresses); allowed a prefix of /24 or longer"),
            "{e}"
        );
        let e = refused("[10.2.0.0/24, 10.3.0.1]");
        assert!(e.contains("found more than 256 addresses in all"), "{e}");
        let e = refused("[10.1.0.8/30, 10.1.0.9]");
        assert!(
            e.contains("found 10.1.0.9 twice; allowed each address once"),
            "{e}"
        );
        let e = refused("[2001:db8::1]");
        assert!(
            e.contains("(IPv6); allowed IPv4: the kernel path SNATs IPv4 flows only"),
            "{e}"
        );
        let e = refused("10.1.0.9/29");
        assert!(e.contains("address bits set beyond the prefix"), "{e}");
        for bad in ["127.0.0.2", "0.0.0.0", "224.0.0.1", "255.255.255.255"] {
            let e = refused(bad);
            assert!(e.contains("is not a unicast address"), "{bad}: {e}");
        }
    }

    #[test]
    fn runs_of_addresses_are_described_as_ranges() {
        let a = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(describe(&[]), "none (each backend's route address)");
        assert_eq!(
            describe(&[a("10.0.0.8"), a("10.0.0.9"), a("10.0.0.10"), a("192.0.2.1")]),
            "10.0.0.8-10.0.0.10, 192.0.2.1"
        );
        assert_eq!(
            describe(&[a("10.0.0.9"), a("10.0.0.8")]),
            "10.0.0.9, 10.0.0.8"
        );
    }
}
