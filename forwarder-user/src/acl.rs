//! Client ACLs as both paths enforce them: a rule's own allow and deny
//! networks and the file's global ones in one list, the most specific
//! entry deciding. Pure: the kernel's trie entries come from here too, so
//! both paths decide alike.

use std::net::IpAddr;

use forwarder_common::{
    ACL_ALLOW, ACL_DENY, ACL_FAMILY_V4, ACL_FAMILY_V6, ACL_KEY_HEAD_BITS, AclKey, addr_from_ipv4_be,
};

use crate::config::{Acl, Cidr, addr_of};

/// What a denied client gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AclAction {
    /// Nothing: its SYN or datagram is dropped.
    #[default]
    Drop,
    /// A TCP RST (a UDP datagram is dropped all the same).
    Reject,
}

impl AclAction {
    pub fn as_str(self) -> &'static str {
        match self {
            AclAction::Drop => "drop",
            AclAction::Reject => "reject",
        }
    }
}

/// One network of the list, in the IPv4-mapped 128-bit form (IPv4
/// `a.b.c.d/n` is `::ffff:a.b.c.d/96+n`), with its family: IPv4 entries
/// (and IPv6 ones inside `::ffff:0:0/96`) match IPv4 clients (and
/// IPv4-mapped ones), IPv6 entries only IPv6 clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    v4: bool,
    network: u128,
    /// 0 to 128, in the mapped form.
    prefix: u8,
    allow: bool,
    /// As written, for `check`.
    shown: Cidr,
}

/// The ACL one rule enforces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleAcl {
    /// Most specific first; no two with the same network.
    entries: Vec<Entry>,
    /// What a client no entry matches gets: as `default` says (the rule's,
    /// else the global one), else allowed unless some entry allows (an
    /// allow list, as a firewall's would).
    pub default_allow: bool,
    pub action: AclAction,
}

/// (IPv4, the mapped form) of an address; IPv4-mapped IPv6 is IPv4.
fn mapped(ip: IpAddr) -> (bool, u128) {
    match ip.to_canonical() {
        IpAddr::V4(v4) => (true, u128::from(v4.to_ipv6_mapped())),
        IpAddr::V6(v6) => (false, u128::from(v6)),
    }
}

fn mask(prefix: u8) -> u128 {
    match prefix {
        0 => 0,
        p => u128::MAX << (128 - u32::from(p)),
    }
}

impl Entry {
    fn new(cidr: Cidr, allow: bool) -> Entry {
        let prefix = match cidr.addr {
            IpAddr::V4(_) => 96 + cidr.prefix,
            IpAddr::V6(_) => cidr.prefix,
        };
        let (v4, network) = mapped(cidr.addr);
        Entry {
            // `::ffff:0:0/96` and within: IPv4 networks written as IPv6.
            v4: v4 && prefix >= 96,
            network: network & mask(prefix),
            prefix,
            allow,
            shown: cidr,
        }
    }

    fn matches(&self, (v4, client): (bool, u128)) -> bool {
        v4 == self.v4 && client & mask(self.prefix) == self.network
    }
}

impl RuleAcl {
    /// The ACL of a rule with `own` entries under the file's `global` ones,
    /// or `None` when neither has an entry nor denies by default. At equal
    /// networks the rule's entry wins; its action and default win if it
    /// names them.
    pub fn combine(own: &Acl, global: &Acl) -> Option<RuleAcl> {
        let listed = |acl: &Acl| {
            let allow = acl.allow.iter().map(|c| Entry::new(*c, true));
            allow
                .chain(acl.deny.iter().map(|c| Entry::new(*c, false)))
                .collect::<Vec<_>>()
        };
        let mut entries = listed(own);
        for g in listed(global) {
            if !entries
                .iter()
                .any(|e| (e.v4, e.network, e.prefix) == (g.v4, g.network, g.prefix))
            {
                entries.push(g);
            }
        }
        let default_allow = own
            .default_allow
            .or(global.default_allow)
            .unwrap_or_else(|| !entries.iter().any(|e| e.allow));
        if entries.is_empty() && default_allow {
            return None;
        }
        // Stable: at equal prefixes the order written stays.
        entries.sort_by_key(|e| std::cmp::Reverse(e.prefix));
        Some(RuleAcl {
            default_allow,
            action: own.action.or(global.action).unwrap_or_default(),
            entries,
        })
    }

    /// Whether `client` may open a flow.
    pub fn allows(&self, client: IpAddr) -> bool {
        let client = mapped(client);
        self.entries
            .iter()
            .find(|e| e.matches(client))
            .map_or(self.default_allow, |e| e.allow)
    }

    /// The kernel's `ACL` trie entries of rule `rule_id`: (prefix length
    /// in bits of the whole key, key data, `ACL_ALLOW` or `ACL_DENY`).
    /// The kernel path looks up IPv4 clients only; IPv6 entries are there
    /// for when it carries IPv6.
    pub fn kernel_entries(&self, rule_id: u32) -> Vec<(u32, AclKey, u32)> {
        self.entries
            .iter()
            .map(|e| {
                let addr = match std::net::Ipv6Addr::from(e.network).to_ipv4_mapped() {
                    Some(v4) if e.v4 => addr_from_ipv4_be(u32::from_ne_bytes(v4.octets())),
                    _ => addr_of(IpAddr::V6(e.network.into())),
                };
                let key = AclKey {
                    rule_id_be: rule_id.to_be(),
                    family: if e.v4 { ACL_FAMILY_V4 } else { ACL_FAMILY_V6 },
                    addr,
                };
                let verdict = if e.allow { ACL_ALLOW } else { ACL_DENY };
                (ACL_KEY_HEAD_BITS + u32::from(e.prefix), key, verdict)
            })
            .collect()
    }

    /// One line for `check`: the entries in the order they are tried, the
    /// default, the action.
    pub fn compact(&self) -> String {
        let mut parts: Vec<String> = self
            .entries
            .iter()
            .map(|e| format!("{} {}", if e.allow { "allow" } else { "deny" }, e.shown))
            .collect();
        parts.push(format!(
            "else {}",
            if self.default_allow { "allow" } else { "deny" }
        ));
        format!("{} ({})", parts.join(", "), self.action.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(text: &str) -> Cidr {
        let (addr, prefix) = text.split_once('/').unwrap();
        Cidr {
            addr: addr.parse().unwrap(),
            prefix: prefix.parse().unwrap(),
        }
    }

    fn acl(allow: &[&str], deny: &[&str]) -> Acl {
        Acl {
            allow: allow.iter().map(|c| cidr(c)).collect(),
            deny: deny.iter().map(|c| cidr(c)).collect(),
            action: None,
            default_allow: None,
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn no_entries_is_no_acl() {
        assert_eq!(RuleAcl::combine(&Acl::default(), &Acl::default()), None);
    }

    #[test]
    fn an_allow_list_denies_the_rest_and_a_deny_list_allows_it() {
        let a = RuleAcl::combine(&acl(&["10.0.0.0/8"], &[]), &Acl::default()).unwrap();
        assert!(a.allows(ip("10.1.2.3")));
        assert!(!a.allows(ip("192.0.2.1")));
        let d = RuleAcl::combine(&acl(&[], &["10.0.0.0/8"]), &Acl::default()).unwrap();
        assert!(!d.allows(ip("10.1.2.3")));
        assert!(d.allows(ip("192.0.2.1")));
    }

    #[test]
    fn the_most_specific_entry_wins_whatever_the_order() {
        let a = RuleAcl::combine(
            &acl(&["10.6.6.7/32", "10.0.0.0/8"], &["10.6.6.0/24"]),
            &Acl::default(),
        )
        .unwrap();
        assert!(a.allows(ip("10.1.1.1")));
        assert!(!a.allows(ip("10.6.6.1")));
        assert!(a.allows(ip("10.6.6.7")));
        assert!(!a.allows(ip("11.0.0.1")), "allow list: the rest is denied");
    }

    #[test]
    fn ipv4_mapped_clients_match_ipv4_entries_and_ipv6_its_own() {
        let a =
            RuleAcl::combine(&acl(&["10.0.0.0/8", "2001:db8::/32"], &[]), &Acl::default()).unwrap();
        assert!(a.allows(ip("::ffff:10.9.9.9")));
        assert!(a.allows(ip("2001:db8::1")));
        assert!(!a.allows(ip("2001:db9::1")));
        // A /0 of one family does not cover the other.
        let v4_all = RuleAcl::combine(&acl(&[], &["0.0.0.0/0"]), &Acl::default()).unwrap();
        assert!(!v4_all.allows(ip("192.0.2.1")));
        assert!(v4_all.allows(ip("2001:db8::1")));
        let v6_all = RuleAcl::combine(&acl(&[], &["::/0"]), &Acl::default()).unwrap();
        assert!(!v6_all.allows(ip("2001:db8::1")));
        assert!(v6_all.allows(ip("192.0.2.1")));
        assert!(v6_all.allows(ip("::ffff:192.0.2.1")));
        // An IPv4 network written in the mapped form is an IPv4 entry.
        let mapped =
            RuleAcl::combine(&acl(&[], &["::ffff:10.0.0.0/104"]), &Acl::default()).unwrap();
        assert!(!mapped.allows(ip("10.1.2.3")));
        assert!(mapped.allows(ip("11.1.2.3")));
    }

    #[test]
    fn rule_and_global_entries_are_one_list_and_the_rule_wins_a_tie() {
        let global = acl(&["192.0.2.0/24"], &["10.0.0.0/8"]);
        let own = acl(&["10.1.0.0/16"], &["192.0.2.0/24"]);
        let a = RuleAcl::combine(&own, &global).unwrap();
        assert!(a.allows(ip("10.1.2.3")), "the rule's more specific allow");
        assert!(!a.allows(ip("10.2.0.1")), "the global deny");
        assert!(
            !a.allows(ip("192.0.2.9")),
            "the rule's deny beats the global allow"
        );
        assert!(
            !a.allows(ip("203.0.113.1")),
            "an allow entry makes the default deny"
        );
        // A rule without entries takes the global list as it is.
        let g = RuleAcl::combine(&Acl::default(), &global).unwrap();
        assert!(g.allows(ip("192.0.2.9")));
        assert!(!g.allows(ip("10.1.2.3")));
    }

    #[test]
    fn the_rule_names_the_action_or_takes_the_global_one() {
        let mut global = acl(&[], &["10.0.0.0/8"]);
        global.action = Some(AclAction::Reject);
        let own = acl(&[], &["10.1.0.0/16"]);
        assert_eq!(
            RuleAcl::combine(&own, &global).unwrap().action,
            AclAction::Reject
        );
        let mut own_drop = own.clone();
        own_drop.action = Some(AclAction::Drop);
        assert_eq!(
            RuleAcl::combine(&own_drop, &global).unwrap().action,
            AclAction::Drop
        );
        assert_eq!(
            RuleAcl::combine(&own, &Acl::default()).unwrap().action,
            AclAction::Drop
        );
    }

    #[test]
    fn an_explicit_default_overrides_the_derived_one_and_the_rule_wins() {
        let mut global = acl(&[], &["10.0.0.0/8"]);
        global.default_allow = Some(false);
        let own = acl(&["10.1.0.0/16"], &[]);
        let g = RuleAcl::combine(&Acl::default(), &global).unwrap();
        assert!(!g.allows(ip("192.0.2.1")), "the global default: deny");
        let mut open = own.clone();
        open.default_allow = Some(true);
        let a = RuleAcl::combine(&open, &global).unwrap();
        assert!(a.allows(ip("192.0.2.1")), "the rule's default: allow");
        assert!(!a.allows(ip("10.2.0.1")));
        assert!(a.allows(ip("10.1.0.1")));
        // `default: deny` alone is an ACL that denies everyone.
        let closed = Acl {
            default_allow: Some(false),
            ..Acl::default()
        };
        let c = RuleAcl::combine(&closed, &Acl::default()).unwrap();
        assert!(!c.allows(ip("10.0.0.1")));
        assert_eq!(c.compact(), "else deny (drop)");
        let allow_all = Acl {
            default_allow: Some(true),
            ..Acl::default()
        };
        assert_eq!(RuleAcl::combine(&allow_all, &Acl::default()), None);
    }

    #[test]
    fn kernel_entries_key_the_rule_and_the_mapped_network() {
        let a =
            RuleAcl::combine(&acl(&["10.0.0.0/8"], &["2001:db8::/32"]), &Acl::default()).unwrap();
        let entries = a.kernel_entries(7);
        assert_eq!(entries.len(), 2);
        let (len, key, verdict) = entries[0];
        assert_eq!((len, verdict), (64 + 96 + 8, ACL_ALLOW));
        assert_eq!((key.rule_id_be, key.family), (7u32.to_be(), ACL_FAMILY_V4));
        assert_eq!(
            key.addr,
            addr_from_ipv4_be(u32::from_ne_bytes([10, 0, 0, 0]))
        );
        let (len, key, verdict) = entries[1];
        assert_eq!((len, verdict), (64 + 32, ACL_DENY));
        assert_eq!(key.family, ACL_FAMILY_V6);
        assert_eq!(key.addr, addr_of(ip("2001:db8::")));
    }

    #[test]
    fn compact_shows_the_order_tried_the_default_and_the_action() {
        let a = RuleAcl::combine(&acl(&["10.0.0.0/8"], &["10.6.6.0/24"]), &Acl::default()).unwrap();
        assert_eq!(
            a.compact(),
            "deny 10.6.6.0/24, allow 10.0.0.0/8, else deny (drop)"
        );
    }
}
