//! YAML to a small tree in which every node knows its line and column.
//!
//! Built from saphyr-parser's events rather than a typed deserializer, so
//! that every value, key and list item keeps its place for error messages,
//! and so that duplicate keys are caught instead of silently overwritten.
//! Scalars stay text: what a value means depends on the field it is in.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;

use saphyr_parser::{Event, Parser, ScalarStyle, Span};

use super::errors::{ConfigError, Pos, quoted};

/// Nesting deeper than this is refused (no rule file needs it; the walkers
/// that read the tree recurse).
const MAX_DEPTH: usize = 64;
/// Nodes in one document, counting each expansion of an alias.
const MAX_NODES: usize = 100_000;

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

/// How a scalar was written; used to place positions inside it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Style {
    Plain,
    Quoted,
    /// A `|` or `>` block whose text starts at this line and column.
    Block {
        line: u32,
        col: u32,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub pos: Pos,
    pub value: Value,
    pub style: Style,
}

impl Node {
    pub fn str(pos: Pos, text: impl Into<String>) -> Node {
        Node {
            pos,
            value: Value::Str(text.into()),
            style: Style::Plain,
        }
    }

    pub fn map(pos: Pos, entries: Vec<(Node, Node)>) -> Node {
        Node {
            pos,
            value: Value::Map(entries),
            style: Style::Plain,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self.value, Value::Null)
    }

    pub fn entries(&self) -> Option<&[(Node, Node)]> {
        match &self.value {
            Value::Map(e) => Some(e),
            _ => None,
        }
    }

    /// The text of a mapping key (keys are always scalars here).
    pub fn key_text(&self) -> &str {
        self.as_str().unwrap_or("")
    }

    /// What kind of value this is, for messages.
    pub fn describe(&self) -> String {
        match &self.value {
            Value::Null => "nothing".into(),
            Value::Str(s) => quoted(s),
            Value::Seq(_) => "a list".into(),
            Value::Map(_) => "a mapping".into(),
        }
    }

    /// Where the character at `offset` (in characters) of a one-line plain
    /// scalar sits; for other styles the start of the node.
    pub fn pos_at(&self, offset: usize) -> Pos {
        match self.style {
            Style::Plain => self.pos.shifted(offset),
            Style::Quoted => self.pos.shifted(offset + 1),
            Style::Block { .. } => self.pos.clone(),
        }
    }

    fn size(&self) -> usize {
        match &self.value {
            Value::Null | Value::Str(_) => 1,
            Value::Seq(items) => 1 + items.iter().map(Node::size).sum::<usize>(),
            Value::Map(entries) => {
                1 + entries
                    .iter()
                    .map(|(k, v)| k.size() + v.size())
                    .sum::<usize>()
            }
        }
    }
}

/// Parses one YAML document. A file with no document is `Null`.
#[cfg(test)]
pub fn parse(text: &str, file: &Arc<str>) -> Result<Node, Vec<ConfigError>> {
    strict(parse_lenient(text, file))
}

/// Like [`parse`], but mistakes that leave the tree whole (a duplicate key,
/// a bad merge) come with the tree, so that later steps can report more.
pub fn parse_lenient(text: &str, file: &Arc<str>) -> (Option<Node>, Vec<ConfigError>) {
    let place = |line: u32, col: u32| Pos::new(file, line, col);
    build(text, &place, &Pos::new(file, 1, 1))
}

fn strict((node, errors): (Option<Node>, Vec<ConfigError>)) -> Result<Node, Vec<ConfigError>> {
    match node {
        Some(node) if errors.is_empty() => Ok(node),
        _ => Err(errors),
    }
}

/// Parses YAML written inside a scalar (Godoxy's inline-YAML labels), with
/// positions mapped back into the file that holds the scalar.
pub fn parse_inline(holder: &Node) -> Result<Node, Vec<ConfigError>> {
    let text = holder.as_str().unwrap_or("");
    let base = holder.pos.clone();
    let style = holder.style;
    let place = move |line: u32, col: u32| match style {
        Style::Block {
            line: first,
            col: indent,
        } => Pos {
            file: base.file.clone(),
            line: first + line - 1,
            col: indent + col - 1,
        },
        Style::Plain | Style::Quoted => {
            let quote = u32::from(style == Style::Quoted);
            if line == 1 {
                base.shifted((quote + col - 1) as usize)
            } else {
                Pos {
                    file: base.file.clone(),
                    line: base.line + line - 1,
                    col,
                }
            }
        }
    };
    strict(build(text, &place, &holder.pos))
}

enum Frame {
    Seq {
        pos: Pos,
        anchor: usize,
        items: Vec<Node>,
    },
    Map {
        pos: Pos,
        anchor: usize,
        entries: Vec<(Node, Node)>,
        seen: HashMap<String, Pos>,
        key: Option<Node>,
    },
}

struct Builder<'p> {
    place: &'p dyn Fn(u32, u32) -> Pos,
    stack: Vec<Frame>,
    anchors: HashMap<usize, (Node, usize)>,
    nodes: usize,
    root: Option<Node>,
    errors: Vec<ConfigError>,
}

fn build(
    text: &str,
    place: &dyn Fn(u32, u32) -> Pos,
    doc_pos: &Pos,
) -> (Option<Node>, Vec<ConfigError>) {
    let mut b = Builder {
        place,
        stack: Vec::new(),
        anchors: HashMap::new(),
        nodes: 0,
        root: None,
        errors: Vec::new(),
    };
    let mut parser = Parser::new_from_str(text);
    let mut documents = 0;
    while let Some(next) = parser.next_event() {
        let (event, span) = match next {
            Ok(x) => x,
            Err(e) => {
                let m = e.marker();
                let pos = place(m.line().max(1) as u32, m.col() as u32 + 1);
                b.errors.push(ConfigError::new(
                    &pos,
                    format!("invalid YAML ({})", e.info()),
                    "well-formed YAML",
                ));
                return (None, b.errors);
            }
        };
        let pos = b.pos_of(&span);
        match event {
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
            Event::DocumentStart(_) => {
                documents += 1;
                if documents > 1 {
                    b.errors.push(ConfigError::new(
                        &pos,
                        "a second YAML document",
                        "one document per file",
                    ));
                    return (None, b.errors);
                }
            }
            Event::Alias(id) => {
                let Some((node, size)) = b.anchors.get(&id).cloned() else {
                    b.errors.push(ConfigError::new(
                        &pos,
                        "an alias to an unknown anchor",
                        "aliases to anchors defined earlier",
                    ));
                    return (None, b.errors);
                };
                if !b.count(size, &pos) {
                    return (None, b.errors);
                }
                b.complete(node, 0);
            }
            Event::Scalar(text, style, anchor, _tag) => {
                if !b.count(1, &pos) {
                    return (None, b.errors);
                }
                let node = scalar(text.into_owned(), style, pos);
                b.complete(node, anchor);
            }
            Event::SequenceStart(anchor, _) => {
                if !b.enter(&pos) {
                    return (None, b.errors);
                }
                b.stack.push(Frame::Seq {
                    pos,
                    anchor,
                    items: Vec::new(),
                });
            }
            Event::MappingStart(anchor, _) => {
                if !b.enter(&pos) {
                    return (None, b.errors);
                }
                b.stack.push(Frame::Map {
                    pos,
                    anchor,
                    entries: Vec::new(),
                    seen: HashMap::new(),
                    key: None,
                });
            }
            Event::SequenceEnd | Event::MappingEnd => match b.stack.pop() {
                Some(Frame::Seq { pos, anchor, items }) => {
                    let node = Node {
                        pos,
                        value: Value::Seq(items),
                        style: Style::Plain,
                    };
                    b.complete(node, anchor);
                }
                Some(Frame::Map {
                    pos,
                    anchor,
                    entries,
                    seen,
                    ..
                }) => {
                    let entries = b.merge_keys(entries, &seen);
                    b.complete(Node::map(pos, entries), anchor);
                }
                None => {}
            },
        }
    }
    let root = b.root.take().unwrap_or(Node {
        pos: doc_pos.clone(),
        value: Value::Null,
        style: Style::Plain,
    });
    (Some(root), b.errors)
}

/// A scalar; a block scalar's span starts where its text does.
fn scalar(text: String, style: ScalarStyle, pos: Pos) -> Node {
    let (value, style) = match style {
        ScalarStyle::Plain => {
            let null = matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL");
            let value = if null { Value::Null } else { Value::Str(text) };
            (value, Style::Plain)
        }
        ScalarStyle::SingleQuoted | ScalarStyle::DoubleQuoted => (Value::Str(text), Style::Quoted),
        ScalarStyle::Literal | ScalarStyle::Folded => {
            let style = Style::Block {
                line: pos.line,
                col: pos.col,
            };
            (Value::Str(text), style)
        }
    };
    Node { pos, value, style }
}

impl Builder<'_> {
    fn pos_of(&self, span: &Span) -> Pos {
        (self.place)(span.start.line().max(1) as u32, span.start.col() as u32 + 1)
    }

    fn count(&mut self, n: usize, pos: &Pos) -> bool {
        self.nodes = self.nodes.saturating_add(n);
        if self.nodes > MAX_NODES {
            self.errors.push(ConfigError::new(
                pos,
                format!("more than {MAX_NODES} values (counting every alias expansion)"),
                "a smaller document",
            ));
            return false;
        }
        true
    }

    fn enter(&mut self, pos: &Pos) -> bool {
        if self.stack.len() >= MAX_DEPTH {
            self.errors.push(ConfigError::new(
                pos,
                format!("nesting deeper than {MAX_DEPTH} levels"),
                "a flatter document",
            ));
            return false;
        }
        self.count(1, pos)
    }

    /// A finished node goes to its parent (or becomes the document).
    fn complete(&mut self, node: Node, anchor: usize) {
        if anchor > 0 {
            let size = node.size();
            self.anchors.insert(anchor, (node.clone(), size));
        }
        match self.stack.last_mut() {
            None => {
                if self.root.is_none() {
                    self.root = Some(node);
                }
            }
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map {
                entries, seen, key, ..
            }) => match key.take() {
                None => {
                    if !matches!(node.value, Value::Str(_)) {
                        self.errors.push(ConfigError::new(
                            &node.pos,
                            format!("{} as a key", node.describe()),
                            "text keys",
                        ));
                    }
                    *key = Some(node);
                }
                Some(k) => {
                    let name = k.key_text().to_owned();
                    match seen.entry(name) {
                        Entry::Occupied(first) => {
                            self.errors.push(
                                ConfigError::new(
                                    &k.pos,
                                    format!("key {} a second time", quoted(k.key_text())),
                                    "each key once per mapping",
                                )
                                .hint(format!("first at {}", first.get())),
                            );
                        }
                        Entry::Vacant(slot) => {
                            slot.insert(k.pos.clone());
                            entries.push((k, node));
                        }
                    }
                }
            },
        }
    }

    /// Applies YAML merge keys (`<<: *anchor`): keys written in the mapping
    /// win over merged ones, earlier merged mappings over later ones.
    fn merge_keys(
        &mut self,
        entries: Vec<(Node, Node)>,
        explicit: &HashMap<String, Pos>,
    ) -> Vec<(Node, Node)> {
        if !entries
            .iter()
            .any(|(k, _)| k.key_text() == "<<" && k.style == Style::Plain)
        {
            return entries;
        }
        let mut out = Vec::with_capacity(entries.len());
        let mut merged: HashMap<String, ()> = HashMap::new();
        for (k, v) in entries {
            if !(k.key_text() == "<<" && k.style == Style::Plain) {
                out.push((k, v));
                continue;
            }
            let sources: Vec<Node> = match v.value {
                Value::Map(_) => vec![v],
                Value::Seq(items) if items.iter().all(|i| i.entries().is_some()) => items,
                _ => {
                    self.errors.push(ConfigError::new(
                        &v.pos,
                        format!("{} after `<<`", v.describe()),
                        "a mapping or a list of mappings to merge",
                    ));
                    continue;
                }
            };
            for source in sources {
                if let Value::Map(inner) = source.value {
                    for (ik, iv) in inner {
                        let name = ik.key_text().to_owned();
                        if explicit.contains_key(&name) || merged.contains_key(&name) {
                            continue;
                        }
                        merged.insert(name, ());
                        out.push((ik, iv));
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(text: &str) -> Node {
        parse(text, &Arc::from("t.yaml")).unwrap()
    }

    fn errs(text: &str) -> Vec<String> {
        parse(text, &Arc::from("t.yaml"))
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn positions_of_keys_and_values() {
        let d = doc("a: 1\nb:\n  c: x y\n  d: [p, q]\n");
        let e = d.entries().unwrap();
        assert_eq!((e[0].0.pos.line, e[0].0.pos.col), (1, 1));
        assert_eq!((e[0].1.pos.line, e[0].1.pos.col), (1, 4));
        let inner = e[1].1.entries().unwrap();
        assert_eq!((inner[0].1.pos.line, inner[0].1.pos.col), (3, 6));
        let Value::Seq(items) = &inner[1].1.value else {
            panic!()
        };
        assert_eq!((items[1].pos.line, items[1].pos.col), (4, 10));
        assert_eq!(items[1].as_str(), Some("q"));
    }

    #[test]
    fn scalars_stay_text_and_nulls_are_null() {
        let d = doc("a: 7878:3478\nb: ~\nc: ''\nd: 010\n");
        let e = d.entries().unwrap();
        assert_eq!(e[0].1.as_str(), Some("7878:3478"));
        assert!(e[1].1.is_null());
        assert!(!e[0].1.is_null() && !e[2].1.is_null() && !d.is_null());
        assert_eq!(e[2].1.as_str(), Some(""));
        assert_eq!(e[3].1.as_str(), Some("010"));
    }

    #[test]
    fn duplicate_keys_are_errors_with_both_places() {
        let e = errs("a: 1\nb: 2\na: 3\n");
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("t.yaml:3:1: found key `a` a second time"));
        assert!(e[0].contains("first at t.yaml:1:1"), "{}", e[0]);
    }

    #[test]
    fn merge_keys_fill_in_missing_fields() {
        let d = doc("x-common: &c\n  scheme: tcp\n  host: h\napp:\n  <<: *c\n  host: other\n");
        let app = &d.entries().unwrap()[1].1;
        let e = app.entries().unwrap();
        let keys: Vec<_> = e.iter().map(|(k, v)| (k.key_text(), v.as_str())).collect();
        assert_eq!(keys, [("scheme", Some("tcp")), ("host", Some("other"))]);
    }

    #[test]
    fn merge_keys_take_a_list_of_mappings_and_nothing_else() {
        let d = doc("a: &a {scheme: tcp}\nb: &b {host: h, scheme: udp}\napp:\n  <<: [*a, *b]\n");
        let app = &d.entries().unwrap()[2].1;
        let keys: Vec<_> = (app.entries().unwrap().iter())
            .map(|(k, v)| (k.key_text(), v.as_str()))
            .collect();
        assert_eq!(keys, [("scheme", Some("tcp")), ("host", Some("h"))]);
        let e = errs("a: &a {scheme: tcp}\napp:\n  <<: [*a, 5]\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].contains("after `<<`; allowed a mapping or a list of mappings"),
            "{}",
            e[0]
        );
    }

    #[test]
    fn syntax_errors_have_a_place() {
        let e = errs("a: 1\nb: [1, 2\n");
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("t.yaml:"), "{}", e[0]);
        assert!(e[0].contains("invalid YAML"), "{}", e[0]);
    }

    #[test]
    fn alias_bombs_and_deep_nesting_are_refused() {
        let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for (i, prev) in ('b'..='j').zip('a'..) {
            bomb.push_str(&format!(
                "{i}: &{i} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
            ));
        }
        assert!(errs(&bomb)[0].contains("more than"));
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(errs(&deep)[0].contains("nesting deeper"));
    }

    #[test]
    fn an_alias_counts_every_value_of_what_it_names() {
        // 21 values under the anchor (the mapping, 10 keys, 10 values), the
        // root, two keys and the list: 25 + 21 per alias, at most 100,000.
        let keys: Vec<String> = (0..10).map(|i| format!("k{i}: v")).collect();
        let text = |aliases: usize| {
            format!(
                "m: &m {{{}}}\nl: [{}]\n",
                keys.join(", "),
                vec!["*m"; aliases].join(", ")
            )
        };
        assert!(parse(&text(4760), &Arc::from("t.yaml")).is_ok());
        assert!(errs(&text(4761))[0].contains("more than 100000 values"));
    }

    #[test]
    fn an_alias_of_a_list_counts_the_list_and_its_items() {
        // The root, two keys, the list `l` and the anchored list (itself
        // and 9 items): 14, and 10 per alias.
        let items = ["1"; 9].join(", ");
        let text =
            |aliases: usize| format!("s: &s [{items}]\nl: [{}]\n", vec!["*s"; aliases].join(", "));
        assert!(parse(&text(9_998), &Arc::from("t.yaml")).is_ok());
        assert!(errs(&text(9_999))[0].contains("more than 100000 values"));
    }

    #[test]
    fn exactly_the_bound_of_values_is_read() {
        // The root, a key and the list: 3 values, and one per item.
        let text = |items: usize| format!("l: [{}]\n", vec!["1"; items].join(", "));
        assert!(parse(&text(99_997), &Arc::from("t.yaml")).is_ok());
        assert!(errs(&text(99_998))[0].contains("more than 100000 values"));
    }

    #[test]
    fn a_second_document_is_an_error() {
        let e = errs("a: 1\n---\nb: 2\n");
        assert!(e[0].contains("a second YAML document"), "{}", e[0]);
    }

    #[test]
    fn inline_yaml_in_a_block_keeps_file_positions() {
        let d = doc("labels:\n  proxy.app: |\n    scheme: tcp\n    port: 1:2\n");
        let holder = &d.entries().unwrap()[0].1.entries().unwrap()[0].1;
        let inner = parse_inline(holder).unwrap();
        let e = inner.entries().unwrap();
        assert_eq!((e[1].0.pos.line, e[1].0.pos.col), (4, 5));
        assert_eq!((e[1].1.pos.line, e[1].1.pos.col), (4, 11));
    }

    #[test]
    fn inline_yaml_on_one_line_is_shifted() {
        let d = doc("k: '{scheme: tcp}'\n");
        let holder = &d.entries().unwrap()[0].1;
        let inner = parse_inline(holder).unwrap();
        let e = inner.entries().unwrap();
        assert_eq!((e[0].1.pos.line, e[0].1.pos.col), (1, 14));
    }
}
