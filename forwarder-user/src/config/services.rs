//! Service names in ports (`port: 2223:dns`): the system's services
//! database (`/etc/services`) first, per protocol, then the names older
//! Godoxy releases knew, which users' route files still carry.

use crate::rules::Protocol;

/// The names Godoxy 0.5 and 0.6 knew (built in, the same for tcp and udp;
/// 0.7 dropped them), for those `/etc/services` names differently or not
/// at all.
const GODOXY_LEGACY: &[(&str, u16)] = &[
    ("mssql", 1433),
    ("mysql", 3306),
    ("mariadb", 3306),
    ("postgres", 5432),
    ("rabbitmq", 5672),
    ("redis", 6379),
    ("memcached", 11211),
    ("mongo", 27017),
    ("ssh", 22),
    ("ftp", 21),
    ("smtp", 25),
    ("dns", 53),
    ("pop3", 110),
    ("imap", 143),
];

/// Whether `s` is written like a service name rather than a mistyped number.
pub(crate) fn looks_like_name(s: &str) -> bool {
    s.bytes().any(|b| b.is_ascii_alphabetic())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'+'))
}

/// The port of `name` for `protocol` in an `/etc/services` text: name or
/// alias, case-sensitive as the C library matches it.
pub(crate) fn lookup_in(text: &str, name: &str, protocol: Protocol) -> Option<u16> {
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut words = line.split_whitespace();
        let (Some(service), Some(port_proto)) = (words.next(), words.next()) else {
            continue;
        };
        let Some((port, proto)) = port_proto.split_once('/') else {
            continue;
        };
        if proto != protocol.as_str() {
            continue;
        }
        if (service == name || words.any(|alias| alias == name))
            && let Ok(p) = port.parse::<u16>()
            && p > 0
        {
            return Some(p);
        }
    }
    None
}

/// The port of `name` for every protocol of the route, or why not.
pub(crate) fn resolve(services: &str, name: &str, protocols: &[Protocol]) -> Result<u16, String> {
    let legacy = GODOXY_LEGACY
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, p)| *p);
    let mut found: Option<(u16, Protocol)> = None;
    for &protocol in protocols {
        let Some(port) = lookup_in(services, name, protocol).or(legacy) else {
            return Err(format!(
                "no service `{name}` for {protocol} in /etc/services"
            ));
        };
        match found {
            Some((first, other)) if first != port => {
                return Err(format!(
                    "service `{name}` is {first}/{other} but {port}/{protocol}"
                ));
            }
            _ => found = Some((port, protocol)),
        }
    }
    found
        .map(|(p, _)| p)
        .ok_or_else(|| format!("no protocol to look service `{name}` up for"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# comment\n\
ssh\t\t22/tcp\t\t\t\t# SSH Remote Login Protocol\n\
domain\t\t53/tcp\n\
domain\t\t53/udp\n\
shell\t\t514/tcp\t\tcmd syslog\t# no passwords used\n\
syslog\t\t514/udp\n\
odd\t\t7/tcp\n\
odd\t\t9/udp\n\
broken-line\n";

    #[test]
    fn names_and_aliases_per_protocol() {
        assert_eq!(lookup_in(TEXT, "ssh", Protocol::Tcp), Some(22));
        assert_eq!(lookup_in(TEXT, "ssh", Protocol::Udp), None);
        assert_eq!(lookup_in(TEXT, "domain", Protocol::Udp), Some(53));
        // `syslog` is an alias of shell on tcp, a name of its own on udp.
        assert_eq!(lookup_in(TEXT, "syslog", Protocol::Tcp), Some(514));
        assert_eq!(lookup_in(TEXT, "syslog", Protocol::Udp), Some(514));
        assert_eq!(lookup_in(TEXT, "SSH", Protocol::Tcp), None);
        assert_eq!(lookup_in(TEXT, "broken-line", Protocol::Tcp), None);
        // Port 0 is no port: the next line with the name is read.
        let zero = "zero\t0/tcp\nzero\t9/tcp\n";
        assert_eq!(lookup_in(zero, "zero", Protocol::Tcp), Some(9));
    }

    #[test]
    fn every_protocol_of_the_route_must_agree() {
        use Protocol::{Tcp, Udp};
        assert_eq!(resolve(TEXT, "domain", &[Tcp, Udp]), Ok(53));
        // Godoxy's own names: `dns` is not in /etc/services.
        assert_eq!(resolve(TEXT, "dns", &[Udp]), Ok(53));
        assert_eq!(resolve(TEXT, "postgres", &[Tcp]), Ok(5432));
        assert_eq!(resolve(TEXT, "ssh", &[Tcp, Udp]), Ok(22));
        assert_eq!(
            resolve(TEXT, "odd", &[Tcp, Udp]),
            Err("service `odd` is 7/tcp but 9/udp".into())
        );
        assert_eq!(
            resolve(TEXT, "nosuch", &[Udp]),
            Err("no service `nosuch` for udp in /etc/services".into())
        );
    }

    #[test]
    fn names_are_told_from_numbers() {
        assert!(looks_like_name("dns"));
        assert!(looks_like_name("domain-s"));
        assert!(!looks_like_name("53"));
        assert!(!looks_like_name("-1"));
        assert!(!looks_like_name("a b"));
    }
}
