//! Incremental reparse: when a policy file is edited, read again only the `network_policies`
//! blocks that changed and keep the others from the previous parse.
//!
//! A full parse of a 10,000-block file takes hundreds of milliseconds, and no YAML reader is fast
//! enough to bring it near the reload budget. Here a one-block edit of that file is read in well
//! under a millisecond by [`Parsed::update`] (in place), or in a few milliseconds by [`reparse`]
//! (which copies the previous policy first). The result is always exactly what a full parse of
//! the new text gives (the same [`Policy`], or the same errors with their positions): whenever
//! that cannot be guaranteed, the full parse is made, and [`Parsed::outcome`] says why.
//!
//! # How
//!
//! [`parse_keeping`] parses the whole file and records its *layout*: the byte offset and line
//! of each block key, all at one column `c` (found from where the reader says each block's value
//! starts: its key is on that line or on the nearest earlier line that is not blank or a
//! comment). [`reparse`] and [`Parsed::update`] then find the changed bytes (the
//! common prefix and suffix of the old and new text) and widens them to whole blocks: from the
//! last block whose key line's first `c + 1` bytes are unchanged, to the first later block key
//! (or the end of the file) that lies in the unchanged suffix. Only that chunk is read, by the
//! same YAML reader and validator, as the document `network_policies:` + chunk. Its blocks
//! replace the old ones; the layout of the blocks after it moves by the chunk's change in bytes
//! and lines.
//!
//! Why the chunk reads alone as it does in the whole file: the YAML reader's state at the start
//! of a block key line at column `c` is always the same (inside the top-level mapping, inside
//! `network_policies`'s block mapping at column `c`, nothing else open), and a key line at
//! column `c` after the chunk closes whatever the chunk left open in block context, as the end of
//! the chunk document does. The conditions below make that hold; every one is checked, and any
//! doubt means a full parse:
//!
//! - the previous file qualifies ([`Unqualified`] lists why it may not): it parsed, used no YAML
//!   aliases (an unchanged block could refer to an anchor in a changed one), had no directives,
//!   no NUL and no lone CR; `network_policies:` stands alone on its line at column 0 with only
//!   blank and comment lines before the first block; every block key is a plain scalar starting
//!   with a letter or `_` (never an integer or a null, whose duplicates YAML compares by value),
//!   alone after `c >= 1` spaces at the start of its line, with no anchor or tag on its value;
//! - the chunk ends with a line break (or at the end of the file), holds no NUL or lone CR, and
//!   no line of it starts at column 0 except comments: so it cannot end the document (`---`,
//!   `...`), reach the sections after `network_policies`, or add a top-level key;
//! - the chunk document reads and validates without any error, without aliases, as a block
//!   mapping whose first key starts the chunk and whose keys pass the same key checks; no chunk
//!   key is also an unchanged block's key;
//! - the YAML reader's resource budget (events, nodes, depth, scalar bytes, anchors) cannot be
//!   exceeded by the new file: the previous file's usage plus the chunk document's stays within
//!   each limit.
//!
//! Limits: an edit before the first block's key (the header, the static sections written before
//! `network_policies`) or touching the last block when sections follow `network_policies` is
//! read in full. Budget usage after a reparse is an upper bound (the previous usage plus the
//! chunk's), so after many reparses a file near a limit is read in full again, which resets it.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use serde_saphyr::budget::BudgetReport;
use serde_saphyr::{Budget, Location};

use super::MAX_POLICY_BYTES;
use super::error::{Collector, PolicyErrors};
use super::model::{NetworkBlock, Policy};
use super::raw::{KeyedBlocks, RawBlocks, RawNetworkOnly, RawPolicy};
use super::validate::{
    read_yaml_tracking_path, too_large, validate_block, validate_raw, yaml_options,
};

/// A validated policy and what a later [`reparse`] of an edited version of its text needs.
#[derive(Clone, Debug)]
pub struct Parsed {
    policy: Policy,
    text: String,
    layout: Result<Layout, Unqualified>,
    usage: Usage,
    outcome: Outcome,
}

/// How a [`Parsed`] was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// [`parse_keeping`]: the whole text was read.
    Full,
    /// [`reparse`] read only the changed blocks.
    Reused {
        /// Blocks kept from the previous parse.
        reused: usize,
        /// Blocks read anew.
        parsed: usize,
    },
    /// [`reparse`] read the whole text, for this reason.
    Fallback(Fallback),
}

/// Why [`reparse`] read the whole text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// The previous text's layout does not allow it.
    Unqualified(Unqualified),
    /// The new text is over [`MAX_POLICY_BYTES`] (the full parse reports it).
    TooLarge,
    /// The edit reaches into the text before the first block key's first character.
    BeforeBlocks,
    /// A changed line does not end with a line break, holds a NUL or a lone CR, or starts at
    /// column 0 without being a comment (an edit after the last block, a new top-level key, a
    /// document marker...).
    ChunkText,
    /// The changed blocks do not read or validate on their own, or use an alias.
    ChunkInvalid,
    /// A changed block's key is not a plain key at the blocks' column, alone on its line.
    ChunkKeys,
    /// A changed block's key is also the key of an unchanged block.
    DuplicateKey,
    /// The new text might exceed the YAML reader's resource budget.
    Budget,
}

/// Why a text's layout does not allow a later [`reparse`] (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unqualified {
    /// `network_policies` is absent or has no block.
    NoBlocks,
    /// The file uses YAML aliases.
    Aliases,
    /// The text holds a NUL or a lone CR (a line break the line count could miss).
    Text,
    /// A block key is not a plain key starting with a letter or `_`, alone on its line after
    /// spaces, at the same column as the others.
    Keys,
    /// The lines before the first block are not `network_policies:` followed by blank and
    /// comment lines, or the file has YAML directives (`%YAML`, `%TAG`).
    Header,
    /// The reader that records key positions failed where the plain one did not.
    Reader,
}

impl Parsed {
    /// The validated policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The validated policy, without what a reparse needs.
    pub fn into_policy(self) -> Policy {
        self.policy
    }

    /// The text this was parsed from.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// How this was made: in full, incrementally, or in full after trying incrementally.
    pub fn outcome(&self) -> Outcome {
        self.outcome
    }

    /// How many blocks were kept from the previous parse (0 unless [`Outcome::Reused`]).
    pub fn reused_blocks(&self) -> usize {
        match self.outcome {
            Outcome::Reused { reused, .. } => reused,
            Outcome::Full | Outcome::Fallback(_) => 0,
        }
    }

    /// Why a later [`reparse`] of an edit of this text will read it in full, if it must.
    pub fn unqualified(&self) -> Option<Unqualified> {
        self.layout.as_ref().err().copied()
    }

    /// Whether two results agree on everything but how they were made and the budget usage
    /// bound: the policy, the text and the layout.
    #[cfg(test)]
    pub(crate) fn same_as(&self, other: &Self) -> bool {
        self.policy == other.policy && self.text == other.text && self.layout == other.layout
    }
}

/// Where the blocks of `network_policies` are in the text.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Layout {
    /// Column (count of spaces) of every block key.
    column: usize,
    /// Every block, in file order.
    blocks: Vec<BlockSpan>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BlockSpan {
    /// Byte offset of the start of the key's line.
    start: usize,
    /// Length of the key in bytes (the key starts `column` bytes after `start`).
    key_len: usize,
    /// 1-based line of the key.
    line: u64,
}

impl BlockSpan {
    fn key<'t>(&self, text: &'t str, column: usize) -> Option<&'t str> {
        let from = self.start + column;
        text.get(from..from + self.key_len)
    }
}

/// What the YAML reader's budget counts (an upper bound after a reparse).
#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    events: usize,
    anchors: usize,
    nodes: usize,
    scalar_bytes: usize,
    merge_keys: usize,
    recorded_anchor_events: usize,
    recorded_anchor_bytes: usize,
    depth: usize,
}

impl Usage {
    fn from_report(r: &BudgetReport) -> Self {
        Self {
            events: r.events,
            anchors: r.anchors,
            nodes: r.nodes,
            scalar_bytes: r.total_scalar_bytes,
            merge_keys: r.merge_keys,
            recorded_anchor_events: r.recorded_anchor_events,
            recorded_anchor_bytes: r.recorded_anchor_bytes,
            depth: r.max_depth,
        }
    }

    /// The usage of a file that holds at most the content of both.
    fn plus(self, o: Self) -> Self {
        Self {
            events: self.events.saturating_add(o.events),
            anchors: self.anchors.saturating_add(o.anchors),
            nodes: self.nodes.saturating_add(o.nodes),
            scalar_bytes: self.scalar_bytes.saturating_add(o.scalar_bytes),
            merge_keys: self.merge_keys.saturating_add(o.merge_keys),
            recorded_anchor_events: self
                .recorded_anchor_events
                .saturating_add(o.recorded_anchor_events),
            recorded_anchor_bytes: self
                .recorded_anchor_bytes
                .saturating_add(o.recorded_anchor_bytes),
            depth: self.depth.max(o.depth),
        }
    }

    fn within(self, b: &Budget) -> bool {
        self.events <= b.max_events
            && self.anchors <= b.max_anchors
            && self.nodes <= b.max_nodes
            && self.scalar_bytes <= b.max_total_scalar_bytes
            && self.merge_keys <= b.max_merge_keys
            && self.recorded_anchor_events <= b.max_recorded_anchor_events
            && self.recorded_anchor_bytes <= b.max_recorded_anchor_bytes
            && self.depth <= b.max_depth
    }
}

/// Parses and validates a policy as [`crate::policy::parse`] does (same result, same errors),
/// and records the layout a later [`reparse`] needs.
pub fn parse_keeping(source_name: &str, text: &str) -> Result<Parsed, PolicyErrors> {
    if text.len() > MAX_POLICY_BYTES {
        return Err(too_large(source_name, text.len() as u64));
    }
    let (read, report) = read_with_report::<RawPolicy<KeyedBlocks>>(text);
    let Ok(keyed) = read else {
        // The error as `parse` reports it, with its field path.
        let raw = read_yaml_tracking_path(source_name, text)?;
        let policy = validate_raw(source_name, &raw)?;
        return Ok(Parsed {
            policy,
            text: text.to_owned(),
            layout: Err(Unqualified::Reader),
            usage: Usage::default(),
            outcome: Outcome::Full,
        });
    };
    let (raw, values) = keyed.split_values();
    let policy = validate_raw(source_name, &raw)?;
    let blocks = raw
        .network_policies
        .as_ref()
        .and_then(|np| np.value.as_ref());
    let layout = match (&report, blocks) {
        (Some(report), Some(blocks)) => find_layout(text, report, blocks, &values),
        (None, _) => Err(Unqualified::Reader),
        (_, None) => Err(Unqualified::NoBlocks),
    };
    Ok(Parsed {
        policy,
        text: text.to_owned(),
        layout,
        usage: report.as_ref().map(Usage::from_report).unwrap_or_default(),
        outcome: Outcome::Full,
    })
}

/// Parses and validates `text`, an edit of `prev`'s text, reading again only the blocks of
/// `network_policies` that changed when that is safe. The result is exactly what
/// [`parse_keeping`] (and so [`crate::policy::parse`]) gives for `text`; any error comes from a
/// full parse.
///
/// The result starts as a copy of `prev`'s policy: at 10,000 blocks the copy costs more than
/// reading the changed block. [`Parsed::update`] does the same work in place, without it.
pub fn reparse(prev: &Parsed, source_name: &str, text: &str) -> Result<Parsed, PolicyErrors> {
    match plan(prev, source_name, text) {
        Ok(plan) => {
            let mut next = prev.clone();
            next.apply(plan, text);
            Ok(next)
        }
        Err(reason) => full_after(reason, source_name, text),
    }
}

impl Parsed {
    /// Makes this the result of parsing `text`, an edit of [`Self::text`], as [`reparse`] does
    /// but in place: only the changed blocks are read and replaced, and the layout of the blocks
    /// after them moved. On error, `self` is left as it was (still the last good parse).
    pub fn update(&mut self, source_name: &str, text: &str) -> Result<(), PolicyErrors> {
        match plan(self, source_name, text) {
            Ok(plan) => self.apply(plan, text),
            Err(reason) => *self = full_after(reason, source_name, text)?,
        }
        Ok(())
    }

    /// Replaces the changed blocks by the chunk's and moves what follows them. Every check was
    /// made by [`plan`], so nothing here can fail.
    fn apply(&mut self, plan: Plan, text: &str) {
        let Plan {
            i,
            j,
            fresh,
            spans,
            line_delta,
            usage,
        } = plan;
        let Ok(layout) = &mut self.layout else {
            return;
        };
        let column = layout.column;
        for span in &layout.blocks[i..j] {
            if let Some(key) = span.key(&self.text, column) {
                self.policy.network.remove(key);
            }
        }
        let parsed = fresh.len();
        self.policy.network.extend(fresh);

        let byte_delta = text.len() as i64 - self.text.len() as i64;
        let after = i + spans.len();
        layout.blocks.splice(i..j, spans);
        for b in &mut layout.blocks[after..] {
            b.start = b.start.saturating_add_signed(byte_delta as isize);
            b.line = b.line.saturating_add_signed(line_delta);
        }
        self.text.clear();
        self.text.push_str(text);
        self.usage = usage;
        self.outcome = Outcome::Reused {
            reused: layout.blocks.len() - parsed,
            parsed,
        };
    }
}

/// The full parse, recording why the incremental one was not made.
fn full_after(reason: Fallback, source_name: &str, text: &str) -> Result<Parsed, PolicyErrors> {
    parse_keeping(source_name, text).map(|mut parsed| {
        parsed.outcome = Outcome::Fallback(reason);
        parsed
    })
}

/// An incremental reparse, checked and ready to apply: blocks `i..j` of the previous layout
/// become `fresh` (with their spans in the new text).
#[derive(Debug)]
pub(crate) struct Plan {
    i: usize,
    j: usize,
    fresh: Vec<(String, Arc<NetworkBlock>)>,
    spans: Vec<BlockSpan>,
    line_delta: i64,
    usage: Usage,
}

/// The document the changed blocks are read as: `PREFIX` then the chunk.
const PREFIX: &str = "network_policies:\n";

/// Reads the changed blocks of `text` and checks everything an incremental reparse needs, or
/// says why it cannot be made. Changes nothing.
pub(crate) fn plan(prev: &Parsed, source_name: &str, text: &str) -> Result<Plan, Fallback> {
    if text.len() > MAX_POLICY_BYTES {
        return Err(Fallback::TooLarge);
    }
    let layout = prev
        .layout
        .as_ref()
        .map_err(|u| Fallback::Unqualified(*u))?;
    let (old, new) = (prev.text.as_bytes(), text.as_bytes());
    let column = layout.column;
    let blocks = &layout.blocks;
    if old == new {
        return Ok(Plan {
            i: 0,
            j: 0,
            fresh: Vec::new(),
            spans: Vec::new(),
            line_delta: 0,
            usage: prev.usage,
        });
    }

    // The changed bytes, widened to whole blocks: `old[s_i..old_end]` became
    // `text[s_i..new_end]`.
    let prefix = common_prefix(old, new);
    let first_changed = blocks.partition_point(|b| b.start + column < prefix);
    let i = first_changed.checked_sub(1).ok_or(Fallback::BeforeBlocks)?;
    // Only the first `column + 1` bytes of block i's line need to be unchanged: the suffix may
    // claim the rest of the common prefix (in repeated text such as a block inserted before a
    // similar one, that keeps the chunk small).
    let kept = blocks[i].start + column + 1;
    let suffix = common_suffix(old, new, old.len().min(new.len()) - kept);
    let old_cut = old.len() - suffix;
    let j = blocks.partition_point(|b| b.start < old_cut);
    let s_i = blocks[i].start;
    let old_end = blocks.get(j).map_or(old.len(), |b| b.start);
    let new_end = new.len() - (old.len() - old_end);
    let chunk = text.get(s_i..new_end).ok_or(Fallback::ChunkText)?;
    // The text the chunk replaces must pass the same checks: a section after
    // `network_policies` deleted together with the last block is a change outside the blocks.
    let replaced = prev.text.get(s_i..old_end).ok_or(Fallback::ChunkText)?;
    if !chunk_text_ok(chunk, new_end == new.len()) || !chunk_text_ok(replaced, old_end == old.len())
    {
        return Err(Fallback::ChunkText);
    }

    // Read the chunk alone.
    let mut doc = String::with_capacity(PREFIX.len() + chunk.len());
    doc.push_str(PREFIX);
    doc.push_str(chunk);
    let (read, report) = read_with_report::<RawNetworkOnly>(&doc);
    let (Ok(raw), Some(report)) = (read, report) else {
        return Err(Fallback::ChunkInvalid);
    };
    if report.aliases != 0 || report.documents != 1 {
        return Err(Fallback::ChunkInvalid);
    }
    let usage = prev.usage.plus(Usage::from_report(&report));
    if !usage.within(&Budget::default()) {
        return Err(Fallback::Budget);
    }
    let keyed = raw
        .network_policies
        .and_then(|np| np.value)
        .ok_or(Fallback::ChunkInvalid)?;

    // The chunk's key positions, in the new text.
    let line_offset = i64::try_from(blocks[i].line).map_err(|_| Fallback::ChunkKeys)? - 2;
    if keyed.values.len() != keyed.blocks.len() || keyed.values.is_empty() {
        return Err(Fallback::ChunkKeys);
    }
    let mut spans: Vec<BlockSpan> = Vec::with_capacity(keyed.values.len());
    for loc in &keyed.values {
        let at = byte_offset(loc)
            .and_then(|o| o.checked_sub(PREFIX.len()))
            .ok_or(Fallback::ChunkKeys)?;
        let line = loc
            .line()
            .checked_add_signed(line_offset)
            .ok_or(Fallback::ChunkKeys)?;
        let (span, key, spaces) = key_of_value(text, s_i + at, line).ok_or(Fallback::ChunkKeys)?;
        if spaces != column
            || span.start < s_i
            || keyed.blocks.get(key).map(|b| &b.referenced) != Some(loc)
            || spans.last().is_some_and(|p| p.start >= span.start)
        {
            return Err(Fallback::ChunkKeys);
        }
        spans.push(span);
    }
    if spans.first().map(|b| b.start) != Some(s_i) {
        return Err(Fallback::ChunkKeys);
    }

    // A chunk key may reuse a replaced block's key, not an unchanged block's.
    let replaced = blocks[i..j]
        .iter()
        .map(|span| span.key(&prev.text, column).ok_or(Fallback::ChunkKeys))
        .collect::<Result<Vec<&str>, Fallback>>()?;
    if keyed
        .blocks
        .keys()
        .any(|k| prev.policy.network.contains_key(k) && !replaced.contains(&k.as_str()))
    {
        return Err(Fallback::DuplicateKey);
    }

    let mut c = Collector::new(source_name);
    let mut fresh = Vec::with_capacity(keyed.blocks.len());
    for (key, block) in &keyed.blocks {
        fresh.push((key.clone(), Arc::new(validate_block(key, block, &mut c))));
    }
    if c.finish().is_err() {
        return Err(Fallback::ChunkInvalid);
    }

    let line_delta = count_lines(chunk) - count_lines(&prev.text[s_i..old_end]);
    // Lines only move by what the chunk's line count changed, so they stay >= 1; checked all
    // the same, as `apply` relies on it.
    if blocks.get(j).is_some_and(|next| {
        next.line
            .checked_add_signed(line_delta)
            .is_none_or(|l| l == 0)
    }) {
        return Err(Fallback::ChunkKeys);
    }
    Ok(Plan {
        i,
        j,
        fresh,
        spans,
        line_delta,
        usage,
    })
}

/// Reads `text` with the policy reader's settings, and the budget report of the read.
fn read_with_report<T: serde::de::DeserializeOwned>(
    text: &str,
) -> (Result<T, serde_saphyr::Error>, Option<BudgetReport>) {
    let report = Rc::new(RefCell::new(None));
    let sink = Rc::clone(&report);
    let options = yaml_options().with_budget_report(move |r| *sink.borrow_mut() = Some(r));
    let read = serde_saphyr::from_str_with_options::<T>(text, options);
    let report = report.borrow_mut().take();
    (read, report)
}

fn byte_offset(loc: &Location) -> Option<usize> {
    usize::try_from(loc.span().byte_offset()?).ok()
}

/// The layout of a file that parsed, or why it does not qualify. `values` are where the values
/// of `network_policies` start, in file order.
fn find_layout(
    text: &str,
    report: &BudgetReport,
    blocks: &RawBlocks,
    values: &[Location],
) -> Result<Layout, Unqualified> {
    if blocks.is_empty() {
        return Err(Unqualified::NoBlocks);
    }
    if report.aliases != 0 || report.documents != 1 {
        return Err(Unqualified::Aliases);
    }
    if !text_ok(text) {
        return Err(Unqualified::Text);
    }
    if values.len() != blocks.len() {
        return Err(Unqualified::Keys);
    }
    let mut spans: Vec<BlockSpan> = Vec::with_capacity(values.len());
    let mut column = None;
    for loc in values {
        let (span, key, spaces) = byte_offset(loc)
            .and_then(|at| key_of_value(text, at, loc.line()))
            .ok_or(Unqualified::Keys)?;
        if *column.get_or_insert(spaces) != spaces
            || blocks.get(key).map(|b| &b.referenced) != Some(loc)
            || spans.last().is_some_and(|p| p.start >= span.start)
        {
            return Err(Unqualified::Keys);
        }
        spans.push(span);
    }
    let column = column.ok_or(Unqualified::NoBlocks)?;
    let header = text.get(..spans[0].start).ok_or(Unqualified::Header)?;
    if !header_ok(header) {
        return Err(Unqualified::Header);
    }
    Ok(Layout {
        column,
        blocks: spans,
    })
}

/// Finds the key of the block value that starts at byte `at` (on 1-based line `line`): on the
/// same line before it, or on the nearest earlier line that is not blank or a comment (YAML
/// allows only blanks and comments between a key and its value). Checks that it is a plain key
/// starting with a letter or `_` (so never an integer or a null, which YAML compares by value),
/// alone on its line after spaces and followed by `:`, then blanks or a comment up to the value.
/// Returns its span, the key and the count of spaces before it.
fn key_of_value(text: &str, at: usize, line: u64) -> Option<(BlockSpan, &str, usize)> {
    let before = text.get(..at)?;
    let value_line = before.rfind('\n').map_or(0, |p| p + 1);
    let (start, line, between) = if before[value_line..].bytes().all(|b| b == b' ') {
        let mut end = value_line;
        let mut line = line;
        loop {
            let prev = end.checked_sub(1)?;
            let start = before[..prev].rfind('\n').map_or(0, |p| p + 1);
            line = line.checked_sub(1)?;
            let content = before[start..prev].trim_end_matches('\r');
            let content = content.trim_start_matches(' ');
            if !content.is_empty() && !content.starts_with('#') {
                // From the colon to the end of the key's line.
                break (start, line, &before[start..prev]);
            }
            end = start;
        }
    } else {
        (value_line, line, &before[value_line..])
    };
    let spaces = between.bytes().take_while(|&b| b == b' ').count();
    let rest = &between[spaces..];
    if spaces == 0
        || !rest
            .as_bytes()
            .first()
            .is_some_and(|b| b.is_ascii_alphabetic() || *b == b'_')
    {
        return None;
    }
    let key_len = rest.find(':')?;
    let key = &rest[..key_len];
    if key.contains(['\n', '\r', '#', '\t'])
        || key.ends_with(' ')
        || key.eq_ignore_ascii_case("null")
    {
        return None;
    }
    // After the colon: blanks up to the value on the same line; or, on an earlier line, the
    // line end, possibly after blanks and a comment.
    let same_line = start == value_line;
    let after = &rest[key_len + 1..];
    let after = if same_line {
        after
    } else {
        after.trim_end_matches('\r')
    };
    match after.as_bytes().first() {
        None if !same_line => {}
        Some(b' ' | b'\t') => {}
        _ => return None,
    }
    let after = after.trim_start_matches([' ', '\t']);
    if !(after.is_empty() || (!same_line && after.starts_with('#'))) {
        return None;
    }
    Some((
        BlockSpan {
            start,
            key_len,
            line,
        },
        key,
        spaces,
    ))
}

/// No NUL (the reader stops there) and no CR but in CR LF (the line count counts LF).
fn text_ok(text: &str) -> bool {
    !text.contains('\0')
        && text
            .match_indices('\r')
            .all(|(at, _)| text.as_bytes().get(at + 1) == Some(&b'\n'))
}

/// The text before the first block key's line: no directive, and the last line that is not blank
/// or a comment is `network_policies:` at column 0 with nothing after it.
fn header_ok(header: &str) -> bool {
    let body = header.strip_prefix('\u{feff}').unwrap_or(header);
    if body.starts_with('%') || body.contains("\n%") {
        return false;
    }
    for line in body.lines().rev() {
        let content = line.trim_start_matches(' ');
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        return line.trim_end_matches(' ') == "network_policies:";
    }
    false
}

/// The changed text: ends with a line break unless it runs to the end of the file, has no NUL
/// or lone CR, and no line of it starts at column 0 except a comment.
fn chunk_text_ok(chunk: &str, to_end: bool) -> bool {
    (to_end || chunk.ends_with('\n'))
        && text_ok(chunk)
        && chunk
            .split('\n')
            .all(|line| matches!(line.as_bytes().first(), None | Some(b' ' | b'#' | b'\r')))
}

fn count_lines(text: &str) -> i64 {
    text.bytes().filter(|&b| b == b'\n').count() as i64
}

fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    const STEP: usize = 256;
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + STEP <= n && a[i..i + STEP] == b[i..i + STEP] {
        i += STEP;
    }
    while i < n && a[i] == b[i] {
        i += 1;
    }
    i
}

/// The length of the common suffix of `a` and `b`, at most `max`.
fn common_suffix(a: &[u8], b: &[u8], max: usize) -> usize {
    const STEP: usize = 256;
    let (la, lb) = (a.len(), b.len());
    let mut n = 0;
    while n + STEP <= max && a[la - n - STEP..la - n] == b[lb - n - STEP..lb - n] {
        n += STEP;
    }
    while n < max && a[la - n - 1] == b[lb - n - 1] {
        n += 1;
    }
    n
}
