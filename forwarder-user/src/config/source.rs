//! The file's sections and where routes come from: the `routes:` map,
//! the `labels:` section and Godoxy route files named by `include:`.
//!
//! Each route leaves here as a [`RawRoute`]: its alias, where it was named,
//! and its fields as a YAML mapping, whatever form it was written in.

use std::path::Path;
use std::sync::Arc;

use super::env::Env;
use super::errors::{ConfigError, Diag, Pos, did_you_mean, quoted};
use super::labels;
use super::values;
use super::yaml::{self, Node, Value};

pub(crate) const SECTIONS: &[&str] = &[
    "interfaces",
    "routes",
    "labels",
    "include",
    "relay",
    "kernel",
    "dns",
    "timeouts",
    "docker",
    "acl",
    "metrics",
];

/// One route in any of the three forms.
#[derive(Clone, Debug)]
pub(crate) struct RawRoute {
    pub alias: String,
    /// Where the alias is named.
    pub pos: Pos,
    /// The route's fields: a mapping (anything else is reported later).
    pub fields: Node,
}

/// A rule file split into its sections.
#[derive(Debug, Default)]
pub(crate) struct RawFile {
    pub interfaces: Option<Node>,
    pub relay: Option<Node>,
    pub dns: Option<Node>,
    pub kernel: Option<Node>,
    pub timeouts: Option<Node>,
    pub docker: Option<Node>,
    pub metrics: Option<Node>,
    /// The ACL every rule enforces along with its own.
    pub acl: Option<Node>,
    /// In file order; includes where the `include:` key stands.
    pub routes: Vec<RawRoute>,
}

/// Reads the main file's sections; `base` is the folder includes are
/// relative to.
pub(crate) fn read(
    text: &str,
    file: &Arc<str>,
    base: &Path,
    env: &dyn Env,
    diag: &mut Diag,
) -> RawFile {
    let mut raw = RawFile::default();
    let (doc, errors) = yaml::parse_lenient(text, file);
    errors.into_iter().for_each(|e| diag.error(e));
    let Some(doc) = doc else {
        return raw;
    };
    let entries = match &doc.value {
        Value::Null => return raw,
        Value::Map(entries) => entries,
        _ => {
            diag.error(ConfigError::new(
                &doc.pos,
                format!("{} at the top level", doc.describe()),
                format!("a mapping with the sections {}", SECTIONS.join(", ")),
            ));
            return raw;
        }
    };
    for (k, v) in entries {
        match k.key_text() {
            "interfaces" => raw.interfaces = Some(v.clone()),
            "relay" => raw.relay = Some(v.clone()),
            "kernel" => raw.kernel = Some(v.clone()),
            "dns" => raw.dns = Some(v.clone()),
            "timeouts" => raw.timeouts = Some(v.clone()),
            "docker" => raw.docker = Some(v.clone()),
            "metrics" => raw.metrics = Some(v.clone()),
            "acl" => raw.acl = Some(v.clone()),
            "routes" => route_map(v, "routes", &mut raw.routes, diag),
            "labels" => raw.routes.extend(labels::routes(v, diag)),
            "include" => include(v, base, env, &mut raw.routes, diag),
            other => {
                let looks_like_route = v.entries().is_some_and(|e| {
                    e.iter()
                        .any(|(f, _)| matches!(f.key_text(), "scheme" | "port" | "host"))
                });
                let hint = if looks_like_route {
                    Some(format!(
                        "a route `{other}`? routes go under `routes:`, or in a Godoxy route file named by `include:`"
                    ))
                } else {
                    did_you_mean(other, SECTIONS)
                };
                diag.error(
                    ConfigError::new(
                        &k.pos,
                        format!("section {}", quoted(other)),
                        format!("the sections {}", SECTIONS.join(", ")),
                    )
                    .maybe_hint(hint),
                );
            }
        }
    }
    raw
}

/// A Godoxy route map: alias -> fields. Aliases starting with `x-` hold
/// YAML anchors for others to merge, as in Godoxy, and are no routes.
fn route_map(node: &Node, section: &str, out: &mut Vec<RawRoute>, diag: &mut Diag) {
    let entries = match &node.value {
        Value::Null => return,
        Value::Map(entries) => entries,
        _ => {
            diag.error(
                ConfigError::new(
                    &node.pos,
                    node.describe(),
                    "a mapping of alias -> route fields",
                )
                .field(section),
            );
            return;
        }
    };
    for (k, v) in entries {
        let alias = k.key_text().trim();
        if alias.starts_with("x-") {
            continue;
        }
        if alias.is_empty() {
            diag.error(
                ConfigError::new(&k.pos, "an empty alias", "a non-empty alias name").field(section),
            );
            continue;
        }
        out.push(RawRoute {
            alias: alias.to_owned(),
            pos: k.pos.clone(),
            fields: v.clone(),
        });
    }
}

/// `include:` one path or a list; each file is a Godoxy route file (its top
/// level an alias map). Relative paths start at the including file's folder.
fn include(node: &Node, base: &Path, env: &dyn Env, out: &mut Vec<RawRoute>, diag: &mut Diag) {
    let items = match values::list(node, false, "a file path or a list of file paths") {
        Ok(items) => items,
        Err(e) => {
            diag.error(e.field("include"));
            return;
        }
    };
    for item in items {
        let rel = item.as_str().unwrap_or("");
        let path = base.join(rel);
        let text = match env.read(&path) {
            Ok(text) => text,
            Err(err) => {
                diag.error(
                    ConfigError::new(
                        &item.pos,
                        format!("{} ({}: {err})", quoted(rel), path.display()),
                        "a readable Godoxy route file (relative paths start at this file's folder)",
                    )
                    .field("include"),
                );
                continue;
            }
        };
        let file: Arc<str> = Arc::from(path.display().to_string());
        let (doc, errors) = yaml::parse_lenient(&text, &file);
        errors.into_iter().for_each(|e| diag.error(e));
        match doc {
            Some(
                doc @ Node {
                    value: Value::Map(_) | Value::Null,
                    ..
                },
            ) => route_map(&doc, "include", out, diag),
            Some(doc) => diag.error(ConfigError::new(
                &doc.pos,
                format!("{} at the top level", doc.describe()),
                "a Godoxy route file: a mapping of alias -> route fields",
            )),
            None => {}
        }
    }
}
