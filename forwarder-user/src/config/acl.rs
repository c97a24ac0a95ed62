//! The `acl` field of a route and the file's global `acl:` section: allow
//! and deny lists of networks, and the action for a denied client.
//! Godoxy's `ip:` and `cidr:` item prefixes are accepted; what the lists
//! mean is [`crate::acl`]'s.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use super::errors::{ConfigError, Pos, closest, quoted};
use super::values::{self, Cidr};
use super::yaml::{Node, Value};
use crate::acl::AclAction;

const ACL_FIELDS: &[&str] = &["allow", "deny", "action", "default"];
const ACTION_ALLOWED: &str = "`drop` (the default) or `reject` (TCP gets an RST)";
const DEFAULT_ALLOWED: &str = "`allow` or `deny` (left out: deny if any entry allows, else allow)";
/// Godoxy's global ACL fields that forwarder does not carry out, and why.
const GODOXY_ONLY: &[(&str, &str)] = &[
    (
        "allow_local",
        "Godoxy's `allow_local`: forwarder lets no network through implicitly; list local networks in `allow`",
    ),
    (
        "maxmind",
        "Godoxy's GeoIP database: forwarder matches addresses only",
    ),
    (
        "log",
        "Godoxy's ACL log: forwarder counts denials in `forwarder status` (`acl_denied`)",
    ),
    ("notify", "Godoxy's ACL notifications: forwarder sends none"),
];

/// Which clients may use a rule, as written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Acl {
    pub allow: Vec<Cidr>,
    pub deny: Vec<Cidr>,
    /// `None`: the global one's, else drop.
    pub action: Option<AclAction>,
    /// What a client no entry matches gets (`true`: allowed), as Godoxy's
    /// `default`; `None`: the global one's, else derived from the entries.
    pub default_allow: Option<bool>,
}

/// An `acl` mapping; every error goes to `report` with its field name
/// (`acl.allow`, ...), and then `None`.
pub(crate) fn parse(node: &Node, report: &mut dyn FnMut(String, ConfigError)) -> Option<Acl> {
    let map = match values::mapping(node, "a mapping of allow and deny lists and an action") {
        Ok(m) => m.into_owned(),
        Err(es) => {
            es.into_iter().for_each(|e| report("acl".into(), e));
            return None;
        }
    };
    let mut acl = Acl::default();
    let mut ok = true;
    // Where each network was first allowed, and the networks denied, to
    // find one in both lists (hashed: a list may hold tens of thousands).
    let mut allowed_at: HashMap<Cidr, Pos> = HashMap::new();
    let mut denied: HashSet<Cidr> = HashSet::new();
    for (k, v) in map.entries().unwrap_or_default() {
        let name = k.key_text();
        let field = format!("acl.{name}");
        let allow = match name {
            "allow" => true,
            "deny" => false,
            "action" | "default" => {
                let set = match name {
                    "action" => action(v).map(|a| acl.action = Some(a)),
                    _ => default_allow(v).map(|d| acl.default_allow = Some(d)),
                };
                if let Err(e) = set {
                    report(field, e);
                    ok = false;
                }
                continue;
            }
            _ => {
                report(field, unknown(k));
                ok = false;
                continue;
            }
        };
        let items = match values::list(v, true, "a list of CIDRs or addresses") {
            Ok(items) => items,
            Err(e) => {
                report(field, e);
                ok = false;
                continue;
            }
        };
        for item in items {
            let cidr = match values::cidr(&without_godoxy_prefix(&item)) {
                Ok(c) => as_ipv4(c),
                Err(e) => {
                    let text = item.as_str().unwrap_or("").trim();
                    let geo = text.starts_with("tz:") || text.starts_with("country:");
                    let e = match geo {
                        true => e.hint(
                            "Godoxy's `tz:` and `country:` need its GeoIP database; forwarder \
                             matches addresses and networks only",
                        ),
                        false => e,
                    };
                    report(field.clone(), e);
                    ok = false;
                    continue;
                }
            };
            if allow {
                allowed_at.entry(cidr).or_insert_with(|| item.pos.clone());
                acl.allow.push(cidr);
            } else if let Some(at) = allowed_at.get(&cidr) {
                report(
                    field.clone(),
                    ConfigError::new(
                        &item.pos,
                        format!("{} both allowed and denied", quoted(&cidr.to_string())),
                        "each network in one list: the most specific entry decides, so a \
                         narrower entry in the other list makes an exception",
                    )
                    .hint(format!("allowed at {at}")),
                );
                ok = false;
            } else {
                denied.insert(cidr);
                acl.deny.push(cidr);
            }
        }
    }
    // An allow entry after its deny twin.
    for c in &acl.allow {
        if denied.contains(c)
            && let Some(at) = allowed_at.get(c)
        {
            report(
                "acl.allow".into(),
                ConfigError::new(
                    at,
                    format!("{} both allowed and denied", quoted(&c.to_string())),
                    "each network in one list",
                ),
            );
            ok = false;
        }
    }
    ok.then_some(acl)
}

/// An IPv4 network written in the IPv4-mapped IPv6 form (`::ffff:10.0.0.0/104`)
/// is the IPv4 network it names, so that it meets its twin in the other list.
fn as_ipv4(c: Cidr) -> Cidr {
    match c.addr {
        IpAddr::V6(v6) if c.prefix >= 96 => match v6.to_ipv4_mapped() {
            Some(v4) => Cidr {
                addr: IpAddr::V4(v4),
                prefix: c.prefix - 96,
            },
            None => c,
        },
        _ => c,
    }
}

fn default_allow(node: &Node) -> Result<bool, ConfigError> {
    let t = values::text(node, DEFAULT_ALLOWED)?;
    match t.trim().to_ascii_lowercase().as_str() {
        "allow" => Ok(true),
        "deny" => Ok(false),
        _ => Err(ConfigError::new(&node.pos, quoted(t), DEFAULT_ALLOWED)),
    }
}

fn action(node: &Node) -> Result<AclAction, ConfigError> {
    let t = values::text(node, ACTION_ALLOWED)?;
    match t.trim().to_ascii_lowercase().as_str() {
        "drop" => Ok(AclAction::Drop),
        "reject" => Ok(AclAction::Reject),
        _ => Err(ConfigError::new(&node.pos, quoted(t), ACTION_ALLOWED)),
    }
}

/// Godoxy writes `ip:1.2.3.4` and `cidr:10.0.0.0/8`; the rest of its
/// matchers (`tz:`, `country:`) need a GeoIP database and stay errors.
fn without_godoxy_prefix(item: &Node) -> Node {
    let text = item.as_str().unwrap_or("").trim();
    match text
        .strip_prefix("ip:")
        .or_else(|| text.strip_prefix("cidr:"))
    {
        Some(rest) => Node {
            value: Value::Str(rest.to_owned()),
            ..item.clone()
        },
        None => item.clone(),
    }
}

fn unknown(key: &Node) -> ConfigError {
    let name = key.key_text();
    let list: Vec<String> = ACL_FIELDS.iter().map(|k| format!("`{k}`")).collect();
    ConfigError::new(
        &key.pos,
        format!("unknown field {}", quoted(name)),
        list.join(", "),
    )
    .maybe_hint(
        GODOXY_ONLY
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, why)| (*why).to_owned())
            .or_else(|| closest(name, ACL_FIELDS).map(|c| format!("did you mean `{c}`?"))),
    )
}
