//! The rule index: which matchers a request could satisfy, found without scanning the others.
//!
//! Every matcher of every rule is an *entry*, numbered in policy order (rule by rule, matcher by
//! matcher), so first-match order is entry order. At load each entry is filed under one part that
//! a request must have for the matcher to match:
//!
//! - an `operation` without `*`: its exact text;
//! - an `operation` with `*`: its literal prefix (the text before the first `*`, maybe empty);
//! - else `path`/`paths`: each glob's leading literal segments, in a trie of path segments;
//! - else `grpc` with an exact service: the service, as the path's first segment;
//! - else (methods or hosts only, a service wildcard, nothing at all): scanned on every request.
//!
//! A request collects the entries filed under its operation, under each prefix of its operation,
//! and under each node its path's segments walk through, and tries them in entry order with the
//! full matcher (conditions included). Every part the index files by must hold for the matcher to
//! match, so the entries it leaves out are exactly ones whose static part fails, and whose
//! condition the plain scan would not have evaluated either: the answer, condition errors
//! included, is the scan's (a property test in `decision` compares the two).

use std::collections::HashMap;

use super::{Matcher, Rule, pattern::PathGlob};

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// See the module documentation.
#[derive(Debug, Default)]
pub struct RuleIndex {
    /// (rule, matcher) of each entry.
    entries: Vec<(u32, u32)>,
    /// Entries tried for every request.
    always: Vec<u32>,
    op_exact: FastMap<Box<str>, Vec<u32>>,
    /// Wildcard operations by literal prefix, and the distinct prefix lengths (ascending).
    op_prefix: FastMap<Box<str>, Vec<u32>>,
    op_prefix_lengths: Vec<usize>,
    paths: PathNode,
    shape: IndexShape,
    /// Some path glob has upper-case letters: a path read in its case may then match another
    /// rule than in lower case, even without upper-case letters of its own.
    globs_in_case: bool,
    /// Some matcher names hosts: a request without a host cannot be matched as its server would.
    names_hosts: bool,
    /// Some matcher takes a HEAD and not a GET: a HEAD may then pick another rule than the GET
    /// whose handler servers answer it with.
    heads_apart: bool,
}

#[derive(Debug, Default)]
struct PathNode {
    entries: Vec<u32>,
    children: FastMap<Box<str>, PathNode>,
}

/// What the index holds, for `stepgate check`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IndexShape {
    pub entries: usize,
    pub by_exact_operation: usize,
    pub by_operation_prefix: usize,
    pub by_path_prefix: usize,
    pub scanned_always: usize,
    pub path_nodes: usize,
    pub path_depth: usize,
    /// The most entries filed under one key (exact operation, operation prefix or path node):
    /// what one request may still have to try.
    pub largest_bucket: usize,
}

/// Where an entry is filed.
enum Key<'a> {
    Operation(&'a str),
    OperationPrefix(&'a str),
    /// The literal segments a path must start with (one list per glob).
    Paths(Vec<Vec<&'a str>>),
    Always,
}

fn key(m: &Matcher) -> Key<'_> {
    if let Some(op) = &m.operation {
        return match op.parts.as_slice() {
            [exact] => Key::Operation(exact),
            [prefix, ..] => Key::OperationPrefix(prefix),
            [] => Key::Always,
        };
    }
    if !m.paths.is_empty() {
        return Key::Paths(m.paths.iter().map(PathGlob::literal_prefix).collect());
    }
    if let Some(grpc) = &m.grpc
        && let [service] = grpc.service.parts.as_slice()
        && !service.is_empty()
    {
        return Key::Paths(vec![vec![service.as_str()]]);
    }
    Key::Always
}

impl RuleIndex {
    /// Whether some path glob has upper-case letters.
    pub fn globs_in_case(&self) -> bool {
        self.globs_in_case
    }

    /// Whether some matcher names hosts.
    pub fn names_hosts(&self) -> bool {
        self.names_hosts
    }

    /// Whether some matcher takes a HEAD and not a GET.
    pub fn heads_apart(&self) -> bool {
        self.heads_apart
    }

    pub fn new(rules: &[Rule]) -> Self {
        let mut index = Self {
            globs_in_case: rules
                .iter()
                .flat_map(|r| &r.matchers)
                .flat_map(|m| &m.paths)
                .any(|g| g.has_upper_case()),
            names_hosts: rules
                .iter()
                .flat_map(|r| &r.matchers)
                .any(|m| !m.hosts.is_empty()),
            heads_apart: rules.iter().flat_map(|r| &r.matchers).any(|m| {
                m.methods.iter().any(|x| x == "HEAD") && !m.methods.iter().any(|x| x == "GET")
            }),
            ..Self::default()
        };
        for (r, rule) in rules.iter().enumerate() {
            for (m, matcher) in rule.matchers.iter().enumerate() {
                let entry = index.entries.len() as u32;
                index.entries.push((r as u32, m as u32));
                match key(matcher) {
                    Key::Operation(op) => {
                        index.shape.by_exact_operation += 1;
                        index.op_exact.entry(op.into()).or_default().push(entry);
                    }
                    Key::OperationPrefix(prefix) => {
                        index.shape.by_operation_prefix += 1;
                        index
                            .op_prefix
                            .entry(prefix.into())
                            .or_default()
                            .push(entry);
                        if !index.op_prefix_lengths.contains(&prefix.len()) {
                            index.op_prefix_lengths.push(prefix.len());
                        }
                    }
                    Key::Paths(prefixes) => {
                        index.shape.by_path_prefix += 1;
                        for prefix in prefixes {
                            index.shape.path_depth = index.shape.path_depth.max(prefix.len());
                            let mut node = &mut index.paths;
                            for segment in prefix {
                                node = node.children.entry(segment.into()).or_default();
                            }
                            // Two globs of one matcher under one node: filed once.
                            if node.entries.last() != Some(&entry) {
                                node.entries.push(entry);
                            }
                        }
                    }
                    Key::Always => {
                        index.shape.scanned_always += 1;
                        index.always.push(entry);
                    }
                }
            }
        }
        index.op_prefix_lengths.sort_unstable();
        index.shape.entries = index.entries.len();
        index.shape.path_nodes = index.paths.count();
        index.shape.largest_bucket = index
            .op_exact
            .values()
            .chain(index.op_prefix.values())
            .map(Vec::len)
            .chain([index.paths.largest()])
            .max()
            .unwrap_or(0);
        index
    }

    pub fn shape(&self) -> IndexShape {
        self.shape
    }

    /// The (rule, matcher) of an entry.
    pub fn entry(&self, entry: u32) -> (usize, usize) {
        let (rule, matcher) = self.entries[entry as usize];
        (rule as usize, matcher as usize)
    }

    /// The entries a request with this operation and (normalised, lower-cased) path could match,
    /// in entry order, into `out` (cleared first).
    pub fn candidates(&self, operation: Option<&str>, path: Option<&str>, out: &mut Vec<u32>) {
        out.clear();
        out.extend_from_slice(&self.always);
        if let Some(op) = operation {
            if let Some(entries) = self.op_exact.get(op) {
                out.extend_from_slice(entries);
            }
            for &len in &self.op_prefix_lengths {
                if len > op.len() {
                    break;
                }
                if let Some(prefix) = op.get(..len)
                    && let Some(entries) = self.op_prefix.get(prefix)
                {
                    out.extend_from_slice(entries);
                }
            }
        }
        if let Some(path) = path {
            let mut node = &self.paths;
            out.extend_from_slice(&node.entries);
            for segment in path.split('/').filter(|s| !s.is_empty()) {
                match node.children.get(segment) {
                    Some(child) => {
                        node = child;
                        out.extend_from_slice(&node.entries);
                    }
                    None => break,
                }
            }
        }
        if out.len() > 1 {
            out.sort_unstable();
            out.dedup();
        }
    }
}

impl PathNode {
    fn count(&self) -> usize {
        1 + self.children.values().map(PathNode::count).sum::<usize>()
    }

    fn largest(&self) -> usize {
        self.children
            .values()
            .map(PathNode::largest)
            .max()
            .unwrap_or(0)
            .max(self.entries.len())
    }
}

impl std::fmt::Display for IndexShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} matcher(s): {} by exact operation, {} by operation prefix, {} by path prefix \
             ({} trie node(s), depth {}), {} tried on every request; at most {} under one key",
            self.entries,
            self.by_exact_operation,
            self.by_operation_prefix,
            self.by_path_prefix,
            self.path_nodes,
            self.path_depth,
            self.scanned_always,
            self.largest_bucket
        )
    }
}
