//! Godoxy's Docker-label form: a flat map of `proxy.*` labels per container.
//!
//! Conventions honoured (as Godoxy reads them):
//! - `proxy.aliases: a, b` (commas or blanks) lists the container's aliases;
//! - `proxy.<alias>.<field>[.<sub>…]` sets one field; an alias not listed
//!   creates a route of its own; an alias with dots is matched against the
//!   listed aliases first;
//! - `proxy.#N.<field>` (or `proxy.$N.<field>`) sets a field of the N-th
//!   listed alias, 1-based;
//! - `proxy.*.<field>` sets a field of every alias that does not set it
//!   itself;
//! - `proxy.<alias>: |` (and `proxy.*: |`) holds the fields as inline YAML,
//!   and so may any field that takes a mapping;
//! - Godoxy's shortcuts (`proxy.schemes`, `proxy.ports`, `proxy.hosts`, …:
//!   the catalog lists them) give one value per listed alias, by index (an
//!   empty item leaves that alias alone);
//! - `proxy.exclude: true` drops the container; Godoxy's other
//!   container-level labels are refused (idle sleep) or ignored with a
//!   warning (`proxy.network`, which Docker discovery reads before these
//!   labels get here), as the [`catalog`](super::catalog) says, and labels
//!   outside `proxy.` are ignored with a warning.
//!
//! A field set twice for one alias by different labels is an error naming
//! both labels.

use super::catalog::{self, Class};
use super::errors::{ConfigError, Diag, Pos, closest, quoted};
use super::source::RawRoute;
use super::values;
use super::yaml::{self, Node, Value};

const ALIAS_FIELDS_ALLOWED: &str =
    "a mapping of fields (inline YAML), or one label per field: `proxy.<alias>.<field>`";

/// One label as written.
struct Label {
    key: String,
    key_pos: Pos,
    value: Node,
}

/// One field setting, after the label's alias part is resolved.
struct Assign {
    label: String,
    /// The field path, each part with its place.
    path: Vec<(String, Pos)>,
    value: Node,
}

enum Target {
    Alias(String, Pos),
    Wildcard,
}

/// The routes of the `labels:` section: one container's flat map, a list of
/// such maps (several containers), or Docker's list form (`key=value`).
pub(crate) fn routes(node: &Node, diag: &mut Diag) -> Vec<RawRoute> {
    match &node.value {
        Value::Null => Vec::new(),
        Value::Map(entries) => container(map_labels(entries), diag),
        Value::Seq(items) if items.iter().all(|i| i.as_str().is_some()) => {
            container(list_labels(items, diag), diag)
        }
        Value::Seq(items) => {
            let mut out = Vec::new();
            for item in items {
                match &item.value {
                    Value::Map(entries) => out.extend(container(map_labels(entries), diag)),
                    _ => diag.error(
                        ConfigError::new(
                            &item.pos,
                            item.describe(),
                            "a mapping of labels per container",
                        )
                        .field("labels"),
                    ),
                }
            }
            out
        }
        Value::Str(_) => {
            diag.error(
                ConfigError::new(
                    &node.pos,
                    node.describe(),
                    "a mapping of labels, a list of such mappings, or a list of `key=value`",
                )
                .field("labels"),
            );
            Vec::new()
        }
    }
}

fn map_labels(entries: &[(Node, Node)]) -> Vec<Label> {
    entries
        .iter()
        .map(|(k, v)| Label {
            key: k.key_text().trim().to_owned(),
            key_pos: k.pos.clone(),
            value: v.clone(),
        })
        .collect()
}

fn list_labels(items: &[Node], diag: &mut Diag) -> Vec<Label> {
    let mut out = Vec::new();
    for item in items {
        let text = item.as_str().unwrap_or("");
        match text.split_once('=') {
            Some((k, v)) => out.push(Label {
                key: k.trim().to_owned(),
                key_pos: item.pos_at(0),
                value: Node::str(item.pos_at(k.chars().count() + 1), v.trim()),
            }),
            None => diag.error(
                ConfigError::new(
                    &item.pos,
                    quoted(text),
                    "`proxy.<alias>.<field>=value` (Docker's list form of labels)",
                )
                .field("labels"),
            ),
        }
    }
    out
}

fn container(labels: Vec<Label>, diag: &mut Diag) -> Vec<RawRoute> {
    // Pass 1: the alias list, the exclude flag.
    let mut listed: Vec<(String, Pos)> = Vec::new();
    let mut exclude: Option<Pos> = None;
    for l in &labels {
        match l.key.as_str() {
            "proxy.aliases" => {
                let items = match values::list(&l.value, true, "a list of aliases") {
                    Ok(items) => items,
                    Err(e) => {
                        diag.error(e.field("proxy.aliases"));
                        continue;
                    }
                };
                for item in items {
                    let name = item.as_str().unwrap_or("").to_owned();
                    if let Some((_, first)) = listed.iter().find(|(a, _)| *a == name) {
                        diag.error(
                            ConfigError::new(
                                &item.pos,
                                format!("alias {} listed twice", quoted(&name)),
                                "each alias once",
                            )
                            .field("proxy.aliases")
                            .hint(format!("first at {first}")),
                        );
                        continue;
                    }
                    listed.push((name, item.pos.clone()));
                }
            }
            "proxy.exclude" => match values::boolean(&l.value) {
                Ok(true) => exclude = Some(l.key_pos.clone()),
                Ok(false) => {}
                Err(e) => diag.error(e.field("proxy.exclude")),
            },
            _ => {}
        }
    }

    // Pass 2: every label becomes field settings.
    let mut own: Vec<(String, Pos, Vec<Assign>)> = listed
        .iter()
        .map(|(a, p)| (a.clone(), p.clone(), Vec::new()))
        .collect();
    let mut wildcard: Vec<Assign> = Vec::new();
    for l in labels {
        let Some(rest) = l.key.strip_prefix("proxy.") else {
            if l.key == "proxy" {
                diag.error(
                    ConfigError::new(
                        &l.key_pos,
                        quoted(&l.key),
                        "`proxy.aliases` or `proxy.<alias>.<field>`",
                    )
                    .field("labels"),
                );
            } else {
                diag.warn(
                    &l.key_pos,
                    None,
                    Some(&l.key),
                    "not a `proxy.` label; ignored".into(),
                );
            }
            continue;
        };
        if let Some(f) = catalog::shortcut(rest) {
            for (i, item) in shortcut_items(&l.value).into_iter().enumerate() {
                let Some(item) = item else { continue };
                match own.get_mut(i).filter(|_| i < listed.len()) {
                    Some((_, _, assigns)) => assigns.push(Assign {
                        label: l.key.clone(),
                        path: vec![(f.name.to_owned(), item.pos.clone())],
                        value: item,
                    }),
                    None => diag.error(
                        ConfigError::new(
                            &item.pos,
                            format!("item {} ({})", i + 1, item.describe()),
                            format!(
                                "one item per alias of `proxy.aliases` ({} listed)",
                                listed.len()
                            ),
                        )
                        .field(l.key.clone()),
                    ),
                }
            }
            continue;
        }
        if let Some(f) = catalog::lookup(rest, true) {
            match f.class {
                // `proxy.aliases` and `proxy.exclude`: read in pass 1.
                Class::Honoured => {}
                // An excluded container's settings do nothing.
                Class::Refused { .. } | Class::NotEnforced { .. } if exclude.is_some() => {}
                Class::Refused { .. } | Class::NotEnforced { .. } => {
                    if !catalog::is_off(f.off, &l.value)
                        && let Some(e) = catalog::refusal(f, &l.key_pos, &l.value)
                    {
                        diag.error(e.field(l.key.clone()));
                    }
                }
                Class::Ignored { .. } => {
                    if let Some(message) = catalog::ignored_warning(f) {
                        diag.warn(&l.key_pos, None, Some(&l.key), message);
                    }
                }
            }
            continue;
        }
        let Some((target, path)) = split_key(&l, rest, &listed, diag) else {
            continue;
        };
        let assign = Assign {
            label: l.key.clone(),
            path,
            value: l.value,
        };
        match target {
            Target::Wildcard => wildcard.push(assign),
            Target::Alias(name, pos) => match own.iter_mut().find(|(a, _, _)| *a == name) {
                Some((_, _, assigns)) => assigns.push(assign),
                None => own.push((name, pos, vec![assign])),
            },
        }
    }

    if let Some(pos) = exclude {
        diag.warn(
            &pos,
            None,
            Some("proxy.exclude"),
            format!(
                "the container is excluded; its {} alias(es) are skipped",
                own.len()
            ),
        );
        return Vec::new();
    }

    let mut wild = Branch::new("proxy.*", None);
    for a in wildcard {
        insert(&mut wild, &a.path, a.value, &a.label, "*", diag);
    }
    own.into_iter()
        .map(|(alias, pos, assigns)| {
            let mut tree = Branch::new("", None);
            for a in assigns {
                insert(&mut tree, &a.path, a.value, &a.label, &alias, diag);
            }
            fill(&mut tree, &wild);
            RawRoute {
                fields: tree.into_node(pos.clone()),
                alias,
                pos,
            }
        })
        .collect()
}

/// The items of a shortcut, one per listed alias; an empty item is `None`.
/// Commas separate items; without commas, blanks do.
fn shortcut_items(value: &Node) -> Vec<Option<Node>> {
    let Some(text) = value.as_str() else {
        return match &value.value {
            Value::Seq(items) => items
                .iter()
                .map(|i| (!i.is_null()).then(|| i.clone()))
                .collect(),
            _ => vec![Some(value.clone())],
        };
    };
    if !text.contains(',') {
        return values::split(value, text, true)
            .into_iter()
            .map(Some)
            .collect();
    }
    let mut out = Vec::new();
    let mut offset = 0;
    for part in text.split(',') {
        let lead = part.chars().take_while(|c| c.is_whitespace()).count();
        let item = part.trim();
        out.push((!item.is_empty()).then(|| Node::str(value.pos_at(offset + lead), item)));
        offset += part.chars().count() + 1;
    }
    out
}

/// Splits `proxy.<rest>` into whom it addresses and the field path.
fn split_key(
    l: &Label,
    rest: &str,
    listed: &[(String, Pos)],
    diag: &mut Diag,
) -> Option<(Target, Vec<(String, Pos)>)> {
    let prefix = "proxy.".len();
    // A listed alias may contain dots (an FQDN): the longest match wins.
    let by_name = listed
        .iter()
        .filter(|(a, _)| {
            rest == a
                || rest
                    .strip_prefix(a.as_str())
                    .is_some_and(|r| r.starts_with('.'))
        })
        .max_by_key(|(a, _)| a.len())
        .map(|(a, _)| a.as_str());
    let head = by_name.unwrap_or_else(|| rest.split('.').next().unwrap_or(""));
    let tail = rest[head.len()..].strip_prefix('.');
    let target = if head == "*" {
        Target::Wildcard
    } else if let Some(n) = head.strip_prefix('#').or_else(|| head.strip_prefix('$')) {
        let index = n.parse::<usize>().ok().filter(|i| *i >= 1);
        match index.and_then(|i| listed.get(i - 1)) {
            Some((name, _)) => Target::Alias(name.clone(), l.key_pos.clone()),
            None => {
                let names: Vec<&str> = listed.iter().map(|(a, _)| a.as_str()).collect();
                let found = match index {
                    Some(_) => format!("index `{head}`, but `proxy.aliases` lists {}", names.len()),
                    None => format!("{} (not an index)", quoted(head)),
                };
                let allowed = if names.is_empty() {
                    "`#N` only with a `proxy.aliases` label".to_owned()
                } else {
                    format!("`#1` to `#{}` ({})", names.len(), names.join(", "))
                };
                diag.error(
                    ConfigError::new(&l.key_pos.shifted(prefix), found, allowed)
                        .field(l.key.clone()),
                );
                return None;
            }
        }
    } else if head.is_empty() {
        diag.error(
            ConfigError::new(&l.key_pos, quoted(&l.key), "`proxy.<alias>.<field>`").field("labels"),
        );
        return None;
    } else {
        Target::Alias(head.to_owned(), l.key_pos.clone())
    };

    let mut path = Vec::new();
    if let Some(tail) = tail {
        let mut offset = prefix + head.chars().count() + 1;
        for part in tail.split('.') {
            if part.is_empty() {
                diag.error(
                    ConfigError::new(&l.key_pos, quoted(&l.key), "label keys without empty parts")
                        .field("labels"),
                );
                return None;
            }
            path.push((part.to_owned(), l.key_pos.shifted(offset)));
            offset += part.chars().count() + 1;
        }
    } else if let (Target::Alias(name, _), false) = (&target, values_is_mapping(&l.value)) {
        // `proxy.<name>: value` that is not a mapping: a mistyped label?
        let known = catalog::container_names();
        diag.error(
            ConfigError::new(&l.value.pos, l.value.describe(), ALIAS_FIELDS_ALLOWED)
                .alias(Some(name))
                .field(l.key.clone())
                .maybe_hint(closest(name, &known).map(|c| format!("did you mean `proxy.{c}`?"))),
        );
        return None;
    }
    Some((target, path))
}

fn values_is_mapping(value: &Node) -> bool {
    match &value.value {
        Value::Map(_) | Value::Null => true,
        Value::Str(s) => values::looks_like_mapping(s),
        Value::Seq(_) => false,
    }
}

/// The fields of one alias while labels are applied.
struct Branch {
    /// The label that made this branch, for conflict messages.
    label: String,
    pos: Option<Pos>,
    entries: Vec<(String, Pos, Tree)>,
}

enum Tree {
    Leaf {
        value: Node,
        label: String,
        pos: Pos,
    },
    Branch(Branch),
}

impl Branch {
    fn new(label: &str, pos: Option<Pos>) -> Branch {
        Branch {
            label: label.to_owned(),
            pos,
            entries: Vec::new(),
        }
    }

    fn into_node(self, pos: Pos) -> Node {
        let entries = self
            .entries
            .into_iter()
            .map(|(name, npos, tree)| {
                let value = match tree {
                    Tree::Leaf { value, .. } => value,
                    Tree::Branch(b) => b.into_node(npos.clone()),
                };
                (Node::str(npos, name), value)
            })
            .collect();
        Node::map(pos, entries)
    }
}

fn dotted(path: &[(String, Pos)]) -> String {
    path.iter()
        .map(|(p, _)| p.as_str())
        .collect::<Vec<_>>()
        .join(".")
}

/// Inline YAML held in a text value, as a mapping node.
fn inline_mapping(value: &Node, alias: &str, field: &str, diag: &mut Diag) -> Option<Node> {
    match yaml::parse_inline(value) {
        Ok(inner) if matches!(inner.value, Value::Map(_)) => Some(inner),
        Ok(_) => {
            diag.error(
                ConfigError::new(&value.pos, value.describe(), ALIAS_FIELDS_ALLOWED)
                    .alias(Some(alias))
                    .field(field),
            );
            None
        }
        Err(errors) => {
            for e in errors {
                diag.error(e.alias(Some(alias)).field(field));
            }
            None
        }
    }
}

/// Sets the field at `path`; a mapping value sets each of its fields.
fn insert(
    branch: &mut Branch,
    path: &[(String, Pos)],
    value: Node,
    label: &str,
    alias: &str,
    diag: &mut Diag,
) {
    if let Value::Map(entries) = value.value {
        for (k, v) in entries {
            let mut p = path.to_vec();
            p.push((k.key_text().to_owned(), k.pos.clone()));
            insert(branch, &p, v, label, alias, diag);
        }
        return;
    }
    let Some(((name, npos), rest)) = path.split_first() else {
        if let Some(inner) = inline_value(&value, alias, label, diag) {
            insert(branch, path, inner, label, alias, diag);
        } else if !value.is_null()
            && value
                .as_str()
                .is_none_or(|s| !values::looks_like_mapping(s))
        {
            diag.error(
                ConfigError::new(&value.pos, value.describe(), ALIAS_FIELDS_ALLOWED)
                    .alias(Some(alias))
                    .field(label),
            );
        }
        return;
    };
    let index = branch.entries.iter().position(|(n, _, _)| n == name);
    let Some(index) = index else {
        if rest.is_empty() {
            branch.entries.push((
                name.clone(),
                npos.clone(),
                Tree::Leaf {
                    value,
                    label: label.to_owned(),
                    pos: npos.clone(),
                },
            ));
        } else {
            let mut b = Branch::new(label, Some(npos.clone()));
            insert(&mut b, rest, value, label, alias, diag);
            branch
                .entries
                .push((name.clone(), npos.clone(), Tree::Branch(b)));
        }
        return;
    };
    let conflict = |diag: &mut Diag, other_label: &str, other_pos: Option<&Pos>| {
        let field = dotted(path);
        let mut e = ConfigError::new(
            npos,
            format!("`{label}` setting `{field}` again"),
            "one setting per field and alias (only `proxy.*` gives way to others)",
        )
        .alias(Some(alias))
        .field(field);
        e = match other_pos {
            Some(p) => e.hint(format!("already set by `{other_label}` at {p}")),
            None => e.hint(format!("already set by `{other_label}`")),
        };
        diag.error(e);
    };
    match &mut branch.entries[index].2 {
        Tree::Leaf {
            value: existing,
            label: other,
            pos,
        } => {
            if rest.is_empty() {
                let (other, pos) = (other.clone(), pos.clone());
                conflict(diag, &other, Some(&pos));
                return;
            }
            // A leaf holding inline YAML opens up into its fields.
            let Some(inner) = inline_value(existing, alias, other, diag) else {
                let (other, pos) = (other.clone(), pos.clone());
                conflict(diag, &other, Some(&pos));
                return;
            };
            let mut b = Branch::new(other, Some(pos.clone()));
            let own_label = other.clone();
            insert(&mut b, &[], inner, &own_label, alias, diag);
            insert(&mut b, rest, value, label, alias, diag);
            branch.entries[index].2 = Tree::Branch(b);
        }
        Tree::Branch(b) => {
            if rest.is_empty() {
                match inline_value(&value, alias, label, diag) {
                    Some(inner) => insert(b, &[], inner, label, alias, diag),
                    None => {
                        let (other, pos) = (b.label.clone(), b.pos.clone());
                        conflict(diag, &other, pos.as_ref());
                    }
                }
            } else {
                insert(b, rest, value, label, alias, diag);
            }
        }
    }
}

/// The mapping inside a text value that holds inline YAML.
fn inline_value(value: &Node, alias: &str, field: &str, diag: &mut Diag) -> Option<Node> {
    let s = value.as_str()?;
    if !values::looks_like_mapping(s) {
        return None;
    }
    inline_mapping(value, alias, field, diag)
}

/// Adds the wildcard's fields that the alias does not set itself.
fn fill(target: &mut Branch, wild: &Branch) {
    for (name, npos, tree) in &wild.entries {
        let existing = target.entries.iter_mut().find(|(n, _, _)| n == name);
        match (existing, tree) {
            (None, _) => target
                .entries
                .push((name.clone(), npos.clone(), clone_tree(tree))),
            (Some((_, _, Tree::Branch(own))), Tree::Branch(w)) => fill(own, w),
            _ => {}
        }
    }
}

fn clone_tree(tree: &Tree) -> Tree {
    match tree {
        Tree::Leaf { value, label, pos } => Tree::Leaf {
            value: value.clone(),
            label: label.clone(),
            pos: pos.clone(),
        },
        Tree::Branch(b) => Tree::Branch(Branch {
            label: b.label.clone(),
            pos: b.pos.clone(),
            entries: b
                .entries
                .iter()
                .map(|(n, p, t)| (n.clone(), p.clone(), clone_tree(t)))
                .collect(),
        }),
    }
}
