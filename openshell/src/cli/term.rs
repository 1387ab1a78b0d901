//! `openshell term`: a live dashboard of the gateway's sandboxes and their denials.
//!
//! Three panels: the sandboxes with the policy revision in force and its status; the denials
//! seen since the dashboard started (the log's recent history first), counted per sandbox,
//! binary, host and port, newest first; and for the selected denial the `network_policies`
//! block that would allow it ([`crate::policy::suggest`]), ready to paste.
//!
//! The gateway is polled every 500 ms (`--interval`). [`State`] holds everything shown and is
//! updated by plain functions ([`State::update`], [`State::handle_key`]) so that it can be tested
//! without a terminal; [`draw`] renders it. The terminal (raw mode, alternate screen) is restored
//! by a guard on drop and by a panic hook, so an error or a panic leaves the shell usable; SIGTERM,
//! SIGHUP and SIGINT end the dashboard like `q` (exit code 128 + the signal) for the same reason.

use std::{
    collections::{BTreeMap, HashMap},
    io::{self, IsTerminal as _, Write as _},
    path::PathBuf,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use clap::Args;
use ratatui::{
    Frame, Terminal,
    backend::CrosstermBackend,
    crossterm::{
        cursor::{Hide, Show},
        event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers},
        execute,
        terminal::{EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode},
    },
    layout::{Constraint, Layout},
    style::{Modifier, Style},
    text::Line,
    widgets::{Block, Cell, Paragraph, Row, Table, TableState, Wrap},
};

use super::{
    logs::rfc3339_ms,
    suggest::{denial_from_record, in_force, revision_policy},
};
use crate::{
    client::Client,
    config::Paths,
    gateway::api::SandboxInfo,
    policy::{self, Denial, Policy},
    store::{DecisionRecord, PolicyRevision},
};

#[derive(Debug, Args)]
pub struct TermArgs {
    /// Decisions read per sandbox and poll (the newest ones).
    #[arg(short = 'n', long = "lines", default_value_t = 1000)]
    pub lines: usize,
    /// Milliseconds between two polls of the gateway.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub interval: u64,
    /// Where `w` appends the selected block.
    #[arg(long, default_value = "openshell-suggestions.yaml")]
    pub out: PathBuf,
}

/// What one poll of the gateway returned for one sandbox.
#[derive(Clone, Debug)]
pub struct SandboxSnapshot {
    pub name: String,
    pub status: String,
    pub processes: usize,
    /// The revision in force, if the sandbox has one.
    pub revision: Option<PolicyRevision>,
    /// The newest decisions, oldest first.
    pub records: Vec<DecisionRecord>,
}

impl SandboxSnapshot {
    fn new(
        info: SandboxInfo,
        revision: Option<PolicyRevision>,
        records: Vec<DecisionRecord>,
    ) -> Self {
        Self {
            name: info.name,
            status: info.status,
            processes: info.processes,
            revision,
            records,
        }
    }
}

/// One line of the sandboxes panel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxRow {
    pub name: String,
    pub status: String,
    pub processes: usize,
    /// Version and status of the revision in force.
    pub policy: Option<(i64, String)>,
}

/// Denials of one sandbox by one binary to one host and port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupKey {
    pub sandbox: String,
    pub binary: String,
    pub host: String,
    pub port: u16,
}

/// One line of the denials panel.
#[derive(Clone, Debug)]
pub struct DenialGroup {
    pub key: GroupKey,
    pub count: usize,
    pub last_ms: i64,
    pub last_reason: String,
    /// The distinct denials of the group (requests differ), counted.
    denials: BTreeMap<Denial, usize>,
}

/// What the last key asks the run loop to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    None,
    Quit,
    /// Quit, then print this block on stdout.
    QuitAndPrint(String),
    /// Append this block to the `--out` file.
    Save(String),
}

/// Which decisions of a sandbox were counted already: the newest time and how many decisions
/// carried it (several can share a millisecond).
#[derive(Clone, Copy, Debug, Default)]
struct Watermark {
    time_ms: i64,
    at_time: usize,
}

/// Everything the dashboard shows.
#[derive(Debug, Default)]
pub struct State {
    pub sandboxes: Vec<SandboxRow>,
    /// Newest first.
    pub groups: Vec<DenialGroup>,
    selected: Option<GroupKey>,
    seen: HashMap<String, Watermark>,
    /// The parsed policy in force per sandbox, by version (or why it does not parse).
    policies: HashMap<String, (i64, Result<Arc<Policy>, String>)>,
    /// The block (or explanation) shown for the selected group.
    pub suggestion: String,
    /// What `suggestion` was computed from (group, its count, policy version): suggesting
    /// compiles the policy, so it is redone only when one of them changes.
    suggested_for: Option<(GroupKey, usize, i64)>,
    /// The last poll's time, or its error.
    pub status: String,
}

impl State {
    /// Takes in one poll: sandboxes replace the previous list, new decisions are counted.
    pub fn update(&mut self, snapshot: Vec<SandboxSnapshot>, now_ms: i64) {
        self.sandboxes.clear();
        for sb in snapshot {
            if let Some(rev) = &sb.revision {
                let stale = self
                    .policies
                    .get(&sb.name)
                    .is_none_or(|(v, _)| *v != rev.version);
                if stale {
                    let parsed = revision_policy(&sb.name, rev)
                        .map(Arc::new)
                        .map_err(|e| e.to_string());
                    self.policies.insert(sb.name.clone(), (rev.version, parsed));
                }
            }
            self.ingest(&sb.name, &sb.records);
            self.sandboxes.push(SandboxRow {
                name: sb.name,
                status: sb.status,
                processes: sb.processes,
                policy: sb
                    .revision
                    .map(|r| (r.version, r.status.as_str().to_owned())),
            });
        }
        let names: Vec<&str> = self.sandboxes.iter().map(|s| s.name.as_str()).collect();
        self.groups
            .retain(|g| names.contains(&g.key.sandbox.as_str()));
        self.groups
            .sort_by(|a, b| b.last_ms.cmp(&a.last_ms).then_with(|| a.key.cmp(&b.key)));
        if self.selected_index().is_none() {
            self.selected = self.groups.first().map(|g| g.key.clone());
        }
        self.status = format!("updated {}", clock(now_ms));
        self.refresh_suggestion();
    }

    /// Records a failed poll; what was shown stays.
    pub fn poll_failed(&mut self, error: &str) {
        self.status = format!("gateway unreachable: {error}");
    }

    /// Counts the decisions of `sandbox` not counted before.
    fn ingest(&mut self, sandbox: &str, records: &[DecisionRecord]) {
        let mark = self.seen.get(sandbox).copied().unwrap_or_default();
        let mut skip_at_mark = mark.at_time;
        let mut newest = mark;
        for r in records {
            if r.time_ms < mark.time_ms {
                continue;
            }
            if r.time_ms == mark.time_ms && skip_at_mark > 0 {
                skip_at_mark -= 1;
                continue;
            }
            if r.time_ms > newest.time_ms {
                newest = Watermark {
                    time_ms: r.time_ms,
                    at_time: 0,
                };
            }
            newest.at_time += 1;
            let Some(denial) = denial_from_record(r) else {
                continue;
            };
            let key = GroupKey {
                sandbox: sandbox.to_owned(),
                binary: denial.binary.display().to_string(),
                host: denial.host.clone(),
                port: denial.port,
            };
            let group = match self.groups.iter_mut().position(|g| g.key == key) {
                Some(i) => &mut self.groups[i],
                None => {
                    self.groups.push(DenialGroup {
                        key,
                        count: 0,
                        last_ms: r.time_ms,
                        last_reason: String::new(),
                        denials: BTreeMap::new(),
                    });
                    let last = self.groups.len() - 1;
                    &mut self.groups[last]
                }
            };
            group.count += 1;
            group.last_ms = group.last_ms.max(r.time_ms);
            group.last_reason.clone_from(&r.reason);
            *group.denials.entry(denial).or_default() += 1;
        }
        self.seen.insert(sandbox.to_owned(), newest);
    }

    fn selected_index(&self) -> Option<usize> {
        let key = self.selected.as_ref()?;
        self.groups.iter().position(|g| &g.key == key)
    }

    fn select(&mut self, index: usize) {
        self.selected = self.groups.get(index).map(|g| g.key.clone());
        self.refresh_suggestion();
    }

    /// Reacts to a key press.
    pub fn handle_key(&mut self, key: KeyEvent) -> Action {
        let current = self.selected_index().unwrap_or(0);
        let last = self.groups.len().saturating_sub(1);
        match key.code {
            KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => Action::Quit,
            KeyCode::Char('q') | KeyCode::Esc => Action::Quit,
            KeyCode::Up | KeyCode::Char('k') => {
                self.select(current.saturating_sub(1));
                Action::None
            }
            KeyCode::Down | KeyCode::Char('j') => {
                self.select((current + 1).min(last));
                Action::None
            }
            KeyCode::Home => {
                self.select(0);
                Action::None
            }
            KeyCode::End => {
                self.select(last);
                Action::None
            }
            KeyCode::Enter if self.selected_index().is_some() => {
                Action::QuitAndPrint(self.suggestion.clone())
            }
            KeyCode::Char('w') if self.selected_index().is_some() => {
                Action::Save(self.suggestion.clone())
            }
            _ => Action::None,
        }
    }

    fn refresh_suggestion(&mut self) {
        let Some(group) = self.selected_index().and_then(|i| self.groups.get(i)) else {
            self.suggested_for = None;
            self.suggestion = "no denial seen yet".to_owned();
            return;
        };
        let (version, policy) = match self.policies.get(&group.key.sandbox) {
            Some((v, Ok(p))) => (*v, p),
            Some((v, Err(e))) => {
                self.suggested_for = None;
                self.suggestion = format!("# policy version {v} does not parse: {e}\n");
                return;
            }
            None => {
                self.suggested_for = None;
                self.suggestion = "# the sandbox has no policy revision\n".to_owned();
                return;
            }
        };
        let basis = (group.key.clone(), group.count, version);
        if self.suggested_for.as_ref() == Some(&basis) {
            return;
        }
        let denials: Vec<Denial> = group
            .denials
            .iter()
            .flat_map(|(d, n)| std::iter::repeat_n(d.clone(), *n))
            .collect();
        let s = policy::suggest(policy, &denials);
        self.suggestion = if s.is_empty() && s.unresolved.is_empty() {
            format!("# allowed by policy version {version} already\n")
        } else {
            format!(
                "# sandbox {}, policy version {version}: paste under network_policies:\n{}",
                group.key.sandbox,
                s.render()
            )
        };
        self.suggested_for = Some(basis);
    }
}

/// `HH:MM:SS` (UTC) of a time in milliseconds.
fn clock(ms: i64) -> String {
    rfc3339_ms(ms).get(11..19).unwrap_or_default().to_owned()
}

fn destination(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Renders the whole dashboard.
pub fn draw(frame: &mut Frame<'_>, state: &State) {
    let bold = Style::default().add_modifier(Modifier::BOLD);
    let sandbox_height = u16::try_from(state.sandboxes.len().clamp(1, 8)).unwrap_or(8) + 3;
    let [top, middle, footer] = Layout::vertical([
        Constraint::Length(sandbox_height),
        Constraint::Min(6),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    let [left, right] =
        Layout::horizontal([Constraint::Percentage(55), Constraint::Percentage(45)]).areas(middle);

    let denials_of = |name: &str| -> usize {
        state
            .groups
            .iter()
            .filter(|g| g.key.sandbox == name)
            .map(|g| g.count)
            .sum()
    };
    let rows = state.sandboxes.iter().map(|s| {
        let policy = s
            .policy
            .as_ref()
            .map_or_else(|| "-".to_owned(), |(v, st)| format!("v{v} {st}"));
        Row::new(vec![
            Cell::from(s.name.clone()),
            Cell::from(s.status.clone()),
            Cell::from(s.processes.to_string()),
            Cell::from(policy),
            Cell::from(denials_of(&s.name).to_string()),
        ])
    });
    let sandboxes = Table::new(
        rows,
        [
            Constraint::Fill(2),
            Constraint::Length(9),
            Constraint::Length(6),
            Constraint::Length(16),
            Constraint::Length(8),
        ],
    )
    .header(Row::new(["SANDBOX", "STATUS", "PROCS", "POLICY", "DENIALS"]).style(bold))
    .block(
        Block::bordered()
            .title(format!(" Sandboxes ({}) ", state.sandboxes.len()))
            .title(Line::from(format!(" {} ", state.status)).right_aligned()),
    );
    frame.render_widget(sandboxes, top);

    let rows = state.groups.iter().map(|g| {
        Row::new(vec![
            Cell::from(g.count.to_string()),
            Cell::from(g.key.sandbox.clone()),
            Cell::from(g.key.binary.clone()),
            Cell::from(destination(&g.key.host, g.key.port)),
            Cell::from(clock(g.last_ms)),
        ])
    });
    let denials = Table::new(
        rows,
        [
            Constraint::Length(6),
            Constraint::Fill(2),
            Constraint::Fill(3),
            Constraint::Fill(4),
            Constraint::Length(8),
        ],
    )
    .header(Row::new(["COUNT", "SANDBOX", "BINARY", "DESTINATION", "LAST"]).style(bold))
    .row_highlight_style(Style::default().add_modifier(Modifier::REVERSED))
    .highlight_symbol("> ")
    .block(Block::bordered().title(" Denials (newest first) "));
    let mut table_state = TableState::default().with_selected(state.selected_index());
    frame.render_stateful_widget(denials, left, &mut table_state);

    let reason = state
        .selected_index()
        .and_then(|i| state.groups.get(i))
        .map(|g| format!("# last reason: {}\n", g.last_reason))
        .unwrap_or_default();
    let text = format!("{reason}{}", state.suggestion);
    let suggestion = Paragraph::new(text)
        .wrap(Wrap { trim: false })
        .block(Block::bordered().title(" Suggested block "));
    frame.render_widget(suggestion, right);

    let help = "↑/↓ select   Enter quit and print the block   w append it to the file   q quit";
    frame.render_widget(Paragraph::new(Line::from(help)), footer);
}

/// Leaves raw mode and the alternate screen (also called from the panic hook).
fn restore_terminal() {
    let _ = disable_raw_mode();
    let _ = execute!(io::stdout(), LeaveAlternateScreen, Show);
}

type PanicHook = Arc<dyn Fn(&std::panic::PanicHookInfo<'_>) + Send + Sync + 'static>;

/// The terminal in dashboard mode; dropping it restores the terminal and the panic hook.
struct TerminalGuard {
    previous_hook: PanicHook,
}

impl TerminalGuard {
    fn enter() -> io::Result<Self> {
        let previous_hook: PanicHook = Arc::from(std::panic::take_hook());
        let chained = Arc::clone(&previous_hook);
        // Restore before the panic message is printed, or it lands in the alternate screen.
        std::panic::set_hook(Box::new(move |info| {
            restore_terminal();
            chained(info);
        }));
        let guard = Self { previous_hook };
        enable_raw_mode()?;
        execute!(io::stdout(), EnterAlternateScreen, Hide)?;
        Ok(guard)
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore_terminal();
        let previous = Arc::clone(&self.previous_hook);
        std::panic::set_hook(Box::new(move |info| previous(info)));
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// One poll: every sandbox with its revision in force and newest decisions.
fn poll(client: &Client, lines: usize) -> Result<Vec<SandboxSnapshot>, crate::client::ClientError> {
    let mut out = Vec::new();
    // A global policy in force governs every sandbox.
    let global = super::suggest::global_in_force(client)?;
    for info in client.list()? {
        let name = info.name.clone();
        // A sandbox deleted between the list and these calls is simply left out.
        let revision = match client.policy_revisions(&name) {
            Ok(revs) => global.clone().or_else(|| in_force(&revs).cloned()),
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e),
        };
        let records = match client.logs(&name, lines) {
            Ok(r) => r,
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e),
        };
        out.push(SandboxSnapshot::new(info, revision, records));
    }
    Ok(out)
}

pub fn run(args: &TermArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(Paths::from_env())?;
    if !client.is_running() {
        anyhow::bail!(
            "openshell term: no gateway answers on {} (start one with `openshell gateway start`)",
            client.paths().socket().display()
        );
    }
    if !io::stdout().is_terminal() || !io::stdin().is_terminal() {
        anyhow::bail!(
            "openshell term needs a terminal on stdin and stdout; in scripts use \
             `openshell logs NAME` and `openshell policy suggest NAME`"
        );
    }
    let lines = args.lines.min(super::logs::MAX_LINES);
    let mut state = State::default();
    // A first poll before the screen switches, so a failure is reported on the normal screen.
    state.update(poll(&client, lines)?, now_ms());
    let interval = Duration::from_millis(args.interval);
    let stop = StopSignals::register().context("handling SIGTERM, SIGHUP and SIGINT")?;
    let ended = {
        let _guard = TerminalGuard::enter().context("switching the terminal to dashboard mode")?;
        let mut terminal =
            Terminal::new(CrosstermBackend::new(io::stdout())).context("opening the terminal")?;
        terminal.clear()?;
        let mut next_poll = Instant::now() + interval;
        loop {
            if let Some(signal) = stop.received() {
                break Ended::Signal(signal);
            }
            if Instant::now() >= next_poll {
                match poll(&client, lines) {
                    Ok(snapshot) => state.update(snapshot, now_ms()),
                    Err(e) => state.poll_failed(&e.to_string()),
                }
                next_poll = Instant::now() + interval;
            }
            terminal.draw(|frame| draw(frame, &state))?;
            let wait = next_poll.saturating_duration_since(Instant::now());
            if !event::poll(wait)? {
                continue;
            }
            let Event::Key(key) = event::read()? else {
                continue;
            };
            if key.kind != KeyEventKind::Press {
                continue;
            }
            match state.handle_key(key) {
                Action::None => {}
                Action::Quit => break Ended::Quit(None),
                Action::QuitAndPrint(text) => break Ended::Quit(Some(text)),
                Action::Save(text) => {
                    let written = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&args.out)
                        .and_then(|mut f| f.write_all(text.as_bytes()));
                    state.status = match written {
                        Ok(()) => format!("appended to {}", args.out.display()),
                        Err(e) => format!("writing {}: {e}", args.out.display()),
                    };
                }
            }
        }
    };
    // The terminal is restored (the guard is gone); the usual signal actions are back.
    drop(stop);
    match ended {
        Ended::Quit(to_print) => {
            if let Some(text) = to_print {
                print!("{text}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Ended::Signal(signal) => Ok(ExitCode::from(signal.saturating_add(128))),
    }
}

/// How the dashboard ended.
enum Ended {
    /// A key: `q`, or Enter with the selected block to print.
    Quit(Option<String>),
    /// A signal (its number): the exit code is 128 + it, as a shell reports a killed command.
    Signal(u8),
}

/// SIGTERM, SIGHUP and SIGINT end the dashboard the way `q` does, so the terminal is restored
/// instead of being left in raw mode on the alternate screen. (In raw mode Ctrl-C is a key;
/// these come from outside: `kill`, a closed terminal window.) Dropping this puts the usual
/// actions back.
struct StopSignals {
    received: Arc<AtomicUsize>,
    ids: Vec<signal_hook::SigId>,
}

impl StopSignals {
    const SIGNALS: [i32; 3] = [
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
        signal_hook::consts::SIGINT,
    ];

    fn register() -> io::Result<Self> {
        let received = Arc::new(AtomicUsize::new(0));
        let mut stop = Self {
            received: Arc::clone(&received),
            ids: Vec::new(),
        };
        for signal in Self::SIGNALS {
            let value = usize::try_from(signal).unwrap_or(usize::MAX);
            stop.ids.push(signal_hook::flag::register_usize(
                signal,
                Arc::clone(&received),
                value,
            )?);
        }
        Ok(stop)
    }

    /// The number of the signal that arrived, if one did.
    fn received(&self) -> Option<u8> {
        match self.received.load(Ordering::SeqCst) {
            0 => None,
            n => Some(u8::try_from(n).unwrap_or(u8::MAX)),
        }
    }
}

impl Drop for StopSignals {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use ratatui::backend::TestBackend;

    use super::*;
    use crate::store::RevisionStatus;

    const POLICY: &str = "version: 1
network_policies:
  pypi:
    name: pypi
    endpoints:
      - host: pypi.org
        port: 443
    binaries:
      - { path: /usr/bin/pip }
";

    fn revision(version: i64) -> PolicyRevision {
        PolicyRevision {
            sandbox: Some("agent".into()),
            version,
            sha256: "0".repeat(64),
            policy: POLICY.into(),
            status: RevisionStatus::Loaded,
            error: None,
            created_ms: 0,
        }
    }

    fn record(time_ms: i64, binary: &str, host: &str, port: u16, reason: &str) -> DecisionRecord {
        DecisionRecord {
            time_ms,
            sandbox: "agent".into(),
            decision: "deny".into(),
            binary: Some(binary.into()),
            pid: Some(7),
            ancestors: vec![],
            host: Some(host.into()),
            ip: Some("198.18.0.10".into()),
            port: Some(port),
            block: None,
            reason: reason.into(),
            revision: Some(2),
        }
    }

    const T0: i64 = 1_795_727_280_000;

    fn snapshot(records: Vec<DecisionRecord>) -> Vec<SandboxSnapshot> {
        vec![
            SandboxSnapshot {
                name: "agent".into(),
                status: "running".into(),
                processes: 2,
                revision: Some(revision(2)),
                records,
            },
            SandboxSnapshot {
                name: "idle-box".into(),
                status: "idle".into(),
                processes: 0,
                revision: None,
                records: vec![],
            },
        ]
    }

    fn history() -> Vec<DecisionRecord> {
        let not_listed =
            "endpoint matches in block pypi but binary /usr/bin/curl is not listed (no ancestors)";
        vec![
            record(T0, "/usr/bin/curl", "pypi.org", 443, not_listed),
            record(T0, "/usr/bin/curl", "pypi.org", 443, not_listed),
            record(
                T0 + 1000,
                "/usr/bin/git",
                "github.com",
                443,
                "no endpoint matches github.com:443",
            ),
        ]
    }

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    #[test]
    fn polls_count_each_decision_once() {
        let mut state = State::default();
        state.update(snapshot(history()), T0 + 2000);
        let counts = |s: &State| -> Vec<(String, usize)> {
            s.groups
                .iter()
                .map(|g| (g.key.host.clone(), g.count))
                .collect()
        };
        assert_eq!(
            counts(&state),
            [("github.com".into(), 1), ("pypi.org".into(), 2)]
        );
        // The same window again: nothing new.
        state.update(snapshot(history()), T0 + 2500);
        assert_eq!(
            counts(&state),
            [("github.com".into(), 1), ("pypi.org".into(), 2)]
        );
        // A third decision in the same millisecond as the newest, and a later one.
        let mut more = history();
        more.push(record(
            T0 + 1000,
            "/usr/bin/git",
            "github.com",
            443,
            "no endpoint matches github.com:443",
        ));
        more.push(record(T0 + 3000, "/usr/bin/curl", "pypi.org", 443, "again"));
        state.update(snapshot(more), T0 + 3500);
        assert_eq!(
            counts(&state),
            [("pypi.org".into(), 3), ("github.com".into(), 2)]
        );
        assert_eq!(state.groups[0].last_reason, "again");
    }

    #[test]
    fn keys_move_the_selection_and_quit() {
        let mut state = State::default();
        assert_eq!(state.handle_key(key(KeyCode::Enter)), Action::None);
        state.update(snapshot(history()), T0 + 2000);
        assert_eq!(state.selected_index(), Some(0));
        assert!(
            state.suggestion.contains("github_com:"),
            "{}",
            state.suggestion
        );
        assert_eq!(state.handle_key(key(KeyCode::Down)), Action::None);
        assert_eq!(state.handle_key(key(KeyCode::Down)), Action::None);
        assert_eq!(state.selected_index(), Some(1));
        assert!(
            state.suggestion.contains("replaces block pypi"),
            "{}",
            state.suggestion
        );
        // The selection follows its group when newer denials reorder the list.
        let mut more = history();
        more.push(record(
            T0 + 5000,
            "/usr/bin/git",
            "github.com",
            443,
            "no endpoint matches github.com:443",
        ));
        state.update(snapshot(more), T0 + 6000);
        assert_eq!(
            state.groups[state.selected_index().unwrap()].key.host,
            "pypi.org"
        );
        assert_eq!(state.handle_key(key(KeyCode::Up)), Action::None);
        assert_eq!(state.handle_key(key(KeyCode::Up)), Action::None);
        assert_eq!(state.selected_index(), Some(0));
        match state.handle_key(key(KeyCode::Enter)) {
            Action::QuitAndPrint(text) => assert!(text.contains("  github_com:\n"), "{text}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            state.handle_key(key(KeyCode::Char('w'))),
            Action::Save(_)
        ));
        assert_eq!(state.handle_key(key(KeyCode::Char('q'))), Action::Quit);
        assert_eq!(state.handle_key(key(KeyCode::Esc)), Action::Quit);
        assert_eq!(
            state.handle_key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)),
            Action::Quit
        );
        state.poll_failed("no gateway is running");
        assert_eq!(state.status, "gateway unreachable: no gateway is running");
        assert_eq!(state.groups.len(), 2);
    }

    #[test]
    fn the_suggestion_follows_the_selection_across_sandboxes() {
        let mut broken = revision(4);
        broken.policy = "version: 1\nnetwork_policies: [\n".into();
        let mut snap = snapshot(history());
        snap[1].revision = Some(broken);
        snap[1].records = vec![record(
            T0 + 9000,
            "/usr/bin/npm",
            "registry.npmjs.org",
            443,
            "x",
        )];
        let mut state = State::default();
        state.update(snap, T0 + 10_000);
        assert_eq!(state.groups[0].key.sandbox, "idle-box");
        assert!(
            state
                .suggestion
                .starts_with("# policy version 4 does not parse: "),
            "{}",
            state.suggestion
        );
        state.handle_key(key(KeyCode::Down));
        assert!(
            state.suggestion.contains("github_com:"),
            "{}",
            state.suggestion
        );
        state.handle_key(key(KeyCode::Up));
        assert!(
            state
                .suggestion
                .starts_with("# policy version 4 does not parse"),
            "{}",
            state.suggestion
        );
        state.handle_key(key(KeyCode::Down));
        assert!(
            state.suggestion.contains("github_com:"),
            "{}",
            state.suggestion
        );
    }

    #[test]
    fn dashboard_rendering() {
        let mut state = State::default();
        state.update(snapshot(history()), T0 + 2000);
        state.handle_key(key(KeyCode::Down));
        let mut terminal = Terminal::new(TestBackend::new(120, 26)).unwrap();
        terminal.draw(|f| draw(f, &state)).unwrap();
        insta::assert_snapshot!(terminal.backend());
    }

    #[test]
    fn empty_dashboard_rendering() {
        let mut state = State::default();
        state.update(Vec::new(), T0);
        let mut terminal = Terminal::new(TestBackend::new(80, 12)).unwrap();
        terminal.draw(|f| draw(f, &state)).unwrap();
        insta::assert_snapshot!(terminal.backend());
    }
}
