//! Routes from running Docker containers: their `proxy.*` labels read with
//! the grammar of the file's `labels:` section ([`labels`]), the target
//! host defaulting to the container's address, and the `docker:` section.
//!
//! Pure: the daemon's discovery (`crate::docker`) gathers [`Container`]s
//! from the Docker Engine; nothing here talks to it.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use super::errors::{ConfigError, Diag, Pos, quoted};
use super::labels;
use super::source::RawRoute;
use super::values;
use super::yaml::{Node, Value};

const DOCKER_FIELDS: &[&str] = &["socket"];
/// Godoxy's label that picks the network the container's address is taken from.
const NETWORK_LABEL: &str = "proxy.network";

/// The `docker:` section: discovery is off unless it is written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DockerSettings {
    /// The Docker Engine API's Unix socket.
    pub socket: PathBuf,
}

/// A running container as the Docker Engine describes it (and as an
/// upgrade hands the last listing over).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Container {
    pub id: String,
    /// Without Docker's leading `/`.
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Network name -> the container's address on it.
    pub networks: BTreeMap<String, IpAddr>,
    /// Container ports exposed or published as UDP and not as TCP.
    pub udp_only_ports: Vec<u16>,
}

impl Container {
    /// Where its labels are, as errors and warnings name it.
    fn label_pos(&self, label: &str) -> Pos {
        let place: Arc<str> =
            Arc::from(format!("docker container `{}`, label `{label}`", self.name));
        Pos::new(&place, 1, 1)
    }

    /// Carries `proxy.` labels at all (others are not ours to read).
    pub fn has_proxy_labels(&self) -> bool {
        self.labels.keys().any(|k| k.starts_with("proxy."))
    }
}

pub(crate) fn settings(node: &Node, diag: &mut Diag) -> Option<DockerSettings> {
    let allowed =
        "a mapping with `socket` (the Docker Engine's Unix socket, e.g. `/var/run/docker.sock`)";
    let entries = match &node.value {
        Value::Map(entries) => entries,
        _ => {
            diag.error(ConfigError::new(&node.pos, node.describe(), allowed).field("docker"));
            return None;
        }
    };
    let mut socket = None;
    // A field given but wrong has its own error; only an empty section
    // lacks the socket.
    let mut any_field = false;
    for (k, v) in entries {
        any_field = true;
        if !DOCKER_FIELDS.contains(&k.key_text()) {
            diag.error(
                ConfigError::new(
                    &k.pos,
                    format!("unknown field {}", quoted(k.key_text())),
                    "`socket`",
                )
                .field(format!("docker.{}", k.key_text())),
            );
            continue;
        }
        match values::text(v, "an absolute path to a Unix socket") {
            Ok(path) if path.trim().starts_with('/') => socket = Some(PathBuf::from(path.trim())),
            Ok(path) => diag.error(
                ConfigError::new(&v.pos, quoted(path), "an absolute path to a Unix socket")
                    .field("docker.socket"),
            ),
            Err(e) => diag.error(e.field("docker.socket")),
        }
    }
    if socket.is_none() && !any_field {
        diag.error(
            ConfigError::new(&node.pos, "no `socket`", allowed)
                .field("docker")
                .hint("leave `docker:` out to read no Docker"),
        );
    }
    socket.map(|socket| DockerSettings { socket })
}

/// The routes of one container. Errors go to `diag`: the caller skips the
/// container if there are any.
pub(crate) fn routes(c: &Container, diag: &mut Diag) -> Vec<RawRoute> {
    let host = match address(c) {
        Ok(host) => host,
        Err(e) => {
            diag.error(e);
            return Vec::new();
        }
    };
    let entries: Vec<(Node, Node)> = c
        .labels
        .iter()
        .filter(|(k, _)| k.starts_with("proxy.") && k.as_str() != NETWORK_LABEL)
        .map(|(k, v)| {
            let pos = c.label_pos(k);
            (
                Node::str(pos.clone(), k.as_str()),
                Node::str(pos, v.as_str()),
            )
        })
        .collect();
    let node = Node::map(c.label_pos("proxy.aliases"), entries);
    let mut routes = labels::routes(&node, diag);
    for r in &mut routes {
        let Value::Map(fields) = &mut r.fields.value else {
            continue;
        };
        let has =
            |fields: &[(Node, Node)], name: &str| fields.iter().any(|(k, _)| k.key_text() == name);
        let pos = r.pos.clone();
        if !has(fields, "host") {
            fields.push((
                Node::str(pos.clone(), "host"),
                Node::str(pos.clone(), host.to_string()),
            ));
        }
        if !has(fields, "scheme")
            && target_port(fields).is_some_and(|p| c.udp_only_ports.contains(&p))
        {
            fields.push((Node::str(pos.clone(), "scheme"), Node::str(pos, "udp")));
        }
    }
    routes
}

/// The target port of a route's `port` field, if it names one by number.
fn target_port(fields: &[(Node, Node)]) -> Option<u16> {
    let (_, node) = fields.iter().find(|(k, _)| k.key_text() == "port")?;
    values::port(node, true, &|_| Err(String::new()))
        .ok()?
        .target
}

/// The container's address on `proxy.network`, or on its only network, or
/// on the first by name when it has several (as Godoxy does).
fn address(c: &Container) -> Result<IpAddr, ConfigError> {
    let networks = || {
        let names: Vec<String> = c.networks.keys().map(|n| format!("`{n}`")).collect();
        if names.is_empty() {
            "a container with an address on a Docker network (it has none)".to_owned()
        } else {
            format!("one of the container's networks: {}", names.join(", "))
        }
    };
    match c.labels.get(NETWORK_LABEL) {
        Some(name) => c.networks.get(name.trim()).copied().ok_or_else(|| {
            ConfigError::new(
                &c.label_pos(NETWORK_LABEL),
                format!("network {}, which the container is not on", quoted(name)),
                networks(),
            )
            .field(NETWORK_LABEL)
        }),
        None => c.networks.values().next().copied().ok_or_else(|| {
            ConfigError::new(&c.label_pos("proxy.aliases"), "no address", networks())
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn turn() -> Container {
        let labels = [
            ("proxy.aliases", "turn-tcp,turn-udp"),
            ("proxy.turn-tcp.port", "7878:3478"),
            ("proxy.turn-udp.port", "7879:3478"),
            ("proxy.turn-udp.scheme", "udp"),
            ("com.example.other", "x"),
        ];
        Container {
            id: "abc".into(),
            name: "turn".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            networks: [("bridge".to_owned(), "172.17.0.2".parse().unwrap())].into(),
            udp_only_ports: Vec::new(),
        }
    }

    fn field<'a>(r: &'a RawRoute, name: &str) -> Option<&'a str> {
        r.fields
            .entries()?
            .iter()
            .find(|(k, _)| k.key_text() == name)
            .and_then(|(_, v)| v.as_str())
    }

    #[test]
    fn host_defaults_to_the_containers_address() {
        let mut diag = Diag::default();
        let routes = routes(&turn(), &mut diag);
        assert!(!diag.has_errors(), "{:?}", diag.errors);
        let aliases: Vec<_> = routes.iter().map(|r| r.alias.as_str()).collect();
        assert_eq!(aliases, ["turn-tcp", "turn-udp"]);
        assert!(
            routes
                .iter()
                .all(|r| field(r, "host") == Some("172.17.0.2"))
        );
    }

    #[test]
    fn a_host_label_wins_over_the_address() {
        let mut c = turn();
        c.labels
            .insert("proxy.turn-tcp.host".into(), "10.1.2.3".into());
        let routes = routes(&c, &mut Diag::default());
        assert_eq!(field(&routes[0], "host"), Some("10.1.2.3"));
    }

    #[test]
    fn proxy_network_picks_the_address() {
        let mut c = turn();
        c.networks
            .insert("backend".into(), "10.9.0.7".parse().unwrap());
        assert_eq!(
            field(&routes(&c, &mut Diag::default())[0], "host"),
            Some("10.9.0.7")
        );
        c.labels.insert(NETWORK_LABEL.into(), "bridge".into());
        let mut diag = Diag::default();
        assert_eq!(field(&routes(&c, &mut diag)[0], "host"), Some("172.17.0.2"));
        assert!(diag.warnings.is_empty(), "{:?}", diag.warnings);
    }

    #[test]
    fn an_unknown_network_is_an_error_naming_container_and_label() {
        let mut c = turn();
        c.labels.insert(NETWORK_LABEL.into(), "nope".into());
        let mut diag = Diag::default();
        assert!(routes(&c, &mut diag).is_empty());
        let text = diag.errors[0].to_string();
        assert!(
            text.contains("container `turn`") && text.contains("proxy.network"),
            "{text}"
        );
        assert!(text.contains("`bridge`"), "{text}");
    }

    #[test]
    fn a_udp_only_target_port_defaults_to_udp() {
        let mut c = turn();
        c.labels.remove("proxy.turn-udp.scheme");
        c.udp_only_ports = vec![3478];
        let routes = routes(&c, &mut Diag::default());
        assert!(routes.iter().all(|r| field(r, "scheme") == Some("udp")));
        let mut c = turn();
        c.labels.remove("proxy.turn-udp.scheme");
        let routes = super::routes(&c, &mut Diag::default());
        assert!(routes.iter().all(|r| field(r, "scheme").is_none()));
    }

    #[test]
    fn a_bad_label_is_an_error_naming_container_and_label() {
        let mut c = turn();
        c.labels.insert("proxy.#9.port".into(), "1:2".into());
        let mut diag = Diag::default();
        routes(&c, &mut diag);
        let text = diag
            .errors
            .iter()
            .map(|e| e.to_string())
            .collect::<String>();
        assert!(
            text.contains("container `turn`, label `proxy.#9.port`"),
            "{text}"
        );
    }

    #[test]
    fn a_clashing_container_is_skipped_alone() {
        let file = "docker: {socket: /run/docker.sock}\nroutes:\n  dns: {scheme: udp, host: 10.0.0.53, port: 5353:53}\n";
        let mut clash = turn();
        clash.id = "def".into();
        clash.name = "a-clash".into();
        clash.labels = [("proxy.aliases", "dns"), ("proxy.dns.port", "5354:53")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        // Not ours to read, so not reported either.
        let mut plain = turn();
        plain.id = "0ff".into();
        plain.name = "plain".into();
        plain.labels.retain(|k, _| !k.starts_with("proxy."));
        let loaded = super::super::load_text_with_containers(
            file,
            Path::new("f.yaml"),
            &[turn(), clash, plain],
        )
        .unwrap();
        let aliases: Vec<_> = loaded
            .compiled
            .listeners
            .iter()
            .map(|l| l.alias.as_str())
            .collect();
        assert_eq!(aliases, ["dns", "turn-tcp", "turn-udp"]);
        assert_eq!(
            loaded.docker.unwrap().socket,
            PathBuf::from("/run/docker.sock")
        );
        let [clashed, ok] = &loaded.containers[..] else {
            panic!("two reports")
        };
        assert_eq!(
            (clashed.name.as_str(), ok.name.as_str()),
            ("a-clash", "turn")
        );
        assert!(clashed.aliases.is_empty() && !clashed.errors.is_empty());
        assert!(
            clashed.errors.concat().contains("`dns`"),
            "{:?}",
            clashed.errors
        );
        assert_eq!(ok.aliases, ["turn-tcp", "turn-udp"]);
    }

    #[test]
    fn the_section_needs_an_absolute_socket() {
        let pos = Pos::new(&Arc::from("f.yaml"), 1, 1);
        let section = |k: &str, v: &str| {
            Node::map(
                pos.clone(),
                vec![(Node::str(pos.clone(), k), Node::str(pos.clone(), v))],
            )
        };
        let mut diag = Diag::default();
        let s = settings(&section("socket", "/var/run/docker.sock"), &mut diag);
        assert_eq!(
            s.map(|s| s.socket),
            Some(PathBuf::from("/var/run/docker.sock"))
        );
        for (k, v) in [("socket", "docker.sock"), ("host", "tcp://x")] {
            let mut diag = Diag::default();
            assert!(settings(&section(k, v), &mut diag).is_none());
            assert_eq!(diag.errors.len(), 1, "{k}: {v}: {:?}", diag.errors);
        }
        let mut diag = Diag::default();
        assert!(settings(&Node::map(pos.clone(), Vec::new()), &mut diag).is_none());
        assert_eq!(diag.errors.len(), 1, "{:?}", diag.errors);
        assert!(
            diag.errors[0].to_string().contains("found no `socket`"),
            "{}",
            diag.errors[0]
        );
    }
}
