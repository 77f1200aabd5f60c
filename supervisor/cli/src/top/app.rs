//! The state of the `top` screen and what each key does to it: selection,
//! sorting, filtering, the detail pane and confirmed actions. No I/O, so
//! the key handling is tested directly.

use super::model::{self, Column, Row};
use plugvisor_proto as pb;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How long a plugin that restarted or failed stays highlighted.
pub const FLASH: Duration = Duration::from_secs(5);

/// Something to ask the daemon, after the user confirmed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Restart(String),
    Stop(String),
    Start(String),
}

impl Action {
    pub fn describe(&self) -> String {
        match self {
            Action::Restart(n) => format!("restart {n}"),
            Action::Stop(n) => format!("stop {n}"),
            Action::Start(n) => format!("start {n}"),
        }
    }
}

/// What the caller has to do after a key.
#[derive(Debug, PartialEq, Eq)]
pub enum Effect {
    None,
    Quit,
    Run(Action),
}

#[derive(Debug)]
pub struct App {
    /// Every row of the last reading, unsorted.
    all: Vec<Row>,
    pub sort: Column,
    pub descending: bool,
    pub filter: String,
    /// Keys go to the filter line until Enter or Esc.
    pub editing_filter: bool,
    /// The selected plugin, by name, so it stays selected as rows move.
    pub selected: Option<String>,
    /// Show one line per replica under each plugin.
    pub expanded: bool,
    /// Show the selected plugin's events and logs.
    pub detail: bool,
    /// An action waiting for `y`.
    pub confirm: Option<Action>,
    /// The last outcome or error, shown on the status line.
    pub message: Option<String>,
    /// The selected plugin's latest events and log lines (detail pane).
    pub events: Vec<pb::Event>,
    pub logs: Vec<pb::LogLine>,
    /// Plugins highlighted until then: they restarted or failed lately.
    flash: HashMap<String, Instant>,
}

impl App {
    pub fn new(sort: Column, filter: String) -> App {
        App {
            all: Vec::new(),
            sort,
            descending: sort.descending_by_default(),
            filter,
            editing_filter: false,
            selected: None,
            expanded: false,
            detail: false,
            confirm: None,
            message: None,
            events: Vec::new(),
            logs: Vec::new(),
            flash: HashMap::new(),
        }
    }

    /// Takes a new set of rows; marks the ones that restarted or went
    /// `failed` since the previous set.
    pub fn update(&mut self, rows: Vec<Row>, now: Instant) {
        for row in &rows {
            let was = self.all.iter().find(|r| r.name == row.name);
            let failed_now = row.state == "failed" && was.is_some_and(|w| w.state != "failed");
            if row.just_restarted || failed_now {
                self.flash.insert(row.name.clone(), now + FLASH);
            }
        }
        self.flash.retain(|_, until| *until > now);
        self.all = rows;
        self.refilter();
    }

    /// Keeps the selection on a visible row after the rows or the filter
    /// changed.
    fn refilter(&mut self) {
        let visible = self.visible();
        let still_there = self
            .selected
            .as_ref()
            .is_some_and(|s| visible.iter().any(|r| &r.name == s));
        if !still_there {
            self.selected = visible.first().map(|r| r.name.clone());
        }
    }

    pub fn flashing(&self, name: &str, now: Instant) -> bool {
        self.flash.get(name).is_some_and(|until| *until > now)
    }

    /// The rows to show: filtered, then sorted.
    pub fn visible(&self) -> Vec<Row> {
        let mut rows: Vec<Row> = self
            .all
            .iter()
            .filter(|r| model::matches(r, &self.filter))
            .cloned()
            .collect();
        model::sort(&mut rows, self.sort, self.descending);
        rows
    }

    pub fn total(&self) -> usize {
        self.all.len()
    }

    fn move_selection(&mut self, by: isize) {
        let visible = self.visible();
        if visible.is_empty() {
            return;
        }
        let at = self
            .selected
            .as_ref()
            .and_then(|s| visible.iter().position(|r| &r.name == s))
            .unwrap_or(0) as isize;
        let to = (at + by).clamp(0, visible.len() as isize - 1) as usize;
        self.selected = Some(visible[to].name.clone());
        self.events.clear();
        self.logs.clear();
    }

    fn sort_by(&mut self, column: Column) {
        if self.sort == column {
            self.descending = !self.descending;
        } else {
            self.sort = column;
            self.descending = column.descending_by_default();
        }
    }

    fn shift_sort(&mut self, by: isize) {
        let n = Column::ALL.len() as isize;
        let at = Column::ALL
            .iter()
            .position(|c| *c == self.sort)
            .unwrap_or(0) as isize;
        self.sort_by(Column::ALL[(at + by).rem_euclid(n) as usize]);
    }

    fn ask(&mut self, make: fn(String) -> Action) {
        match &self.selected {
            Some(name) => self.confirm = Some(make(name.clone())),
            None => self.message = Some("no plugin selected".into()),
        }
    }

    pub fn on_key(&mut self, key: KeyEvent) -> Effect {
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            return Effect::Quit;
        }
        if let Some(action) = self.confirm.take() {
            return match key.code {
                KeyCode::Char('y') | KeyCode::Char('Y') => Effect::Run(action),
                _ => {
                    self.message = Some(format!("cancelled: {}", action.describe()));
                    Effect::None
                }
            };
        }
        if self.editing_filter {
            match key.code {
                KeyCode::Enter => self.editing_filter = false,
                KeyCode::Esc => {
                    self.editing_filter = false;
                    self.filter.clear();
                }
                KeyCode::Backspace => {
                    self.filter.pop();
                }
                KeyCode::Char(c) => self.filter.push(c),
                _ => {}
            }
            self.refilter();
            return Effect::None;
        }
        match key.code {
            KeyCode::Char('q') => return Effect::Quit,
            KeyCode::Esc if self.detail => self.detail = false,
            KeyCode::Esc => {
                self.filter.clear();
                self.refilter();
            }
            KeyCode::Up | KeyCode::Char('k') => self.move_selection(-1),
            KeyCode::Down | KeyCode::Char('j') => self.move_selection(1),
            KeyCode::PageUp => self.move_selection(-10),
            KeyCode::PageDown => self.move_selection(10),
            KeyCode::Home => self.move_selection(isize::MIN / 2),
            KeyCode::End => self.move_selection(isize::MAX / 2),
            KeyCode::Enter => self.detail = !self.detail,
            KeyCode::Char('e') => self.expanded = !self.expanded,
            KeyCode::Char('/') => {
                self.editing_filter = true;
                self.filter.clear();
            }
            KeyCode::Char('<') | KeyCode::Left => self.shift_sort(-1),
            KeyCode::Char('>') | KeyCode::Right => self.shift_sort(1),
            KeyCode::Char('i') => self.descending = !self.descending,
            KeyCode::Char(c @ '1'..='9') => {
                self.sort_by(Column::ALL[c as usize - '1' as usize]);
            }
            KeyCode::Char('0') => self.sort_by(Column::ALL[9]),
            KeyCode::Char('r') => self.ask(Action::Restart),
            KeyCode::Char('x') => self.ask(Action::Stop),
            KeyCode::Char('s') => self.ask(Action::Start),
            _ => {}
        }
        Effect::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(c: char) -> KeyEvent {
        KeyEvent::new(KeyCode::Char(c), KeyModifiers::NONE)
    }

    fn row(name: &str, state: &str, restarts: u32, just_restarted: bool) -> Row {
        Row {
            name: name.into(),
            state: state.into(),
            restarts,
            just_restarted,
            ..Row::default()
        }
    }

    fn app() -> App {
        let mut app = App::new(Column::Name, String::new());
        app.update(
            vec![row("b", "ready", 0, false), row("a", "ready", 0, false)],
            Instant::now(),
        );
        app
    }

    #[test]
    fn restart_runs_only_after_yes() {
        let mut app = app();
        assert_eq!(app.selected.as_deref(), Some("a"));
        assert_eq!(app.on_key(key('r')), Effect::None);
        assert_eq!(app.confirm, Some(Action::Restart("a".into())));
        assert_eq!(app.on_key(key('n')), Effect::None);
        assert!(app.confirm.is_none());
        assert_eq!(app.message.as_deref(), Some("cancelled: restart a"));
        app.on_key(key('j'));
        app.on_key(key('x'));
        assert_eq!(app.on_key(key('y')), Effect::Run(Action::Stop("b".into())));
    }

    #[test]
    fn filter_keeps_matching_rows_and_moves_the_selection() {
        let mut app = app();
        app.on_key(key('/'));
        app.on_key(key('b'));
        assert_eq!(app.visible().len(), 1);
        assert_eq!(app.selected.as_deref(), Some("b"));
        app.on_key(KeyEvent::new(KeyCode::Enter, KeyModifiers::NONE));
        assert!(!app.editing_filter);
        assert_eq!(app.on_key(key('q')), Effect::Quit, "q quits once typed out");
    }

    #[test]
    fn same_sort_key_twice_reverses() {
        let mut app = app();
        app.on_key(key('1'));
        assert!(app.descending);
        assert_eq!(app.visible()[0].name, "b");
        app.on_key(key('5'));
        assert_eq!((app.sort, app.descending), (Column::Restarts, true));
    }

    #[test]
    fn restarted_or_failed_plugins_flash_for_a_while() {
        let mut app = app();
        let now = Instant::now();
        app.update(
            vec![row("a", "ready", 1, true), row("b", "failed", 0, false)],
            now,
        );
        assert!(app.flashing("a", now));
        assert!(app.flashing("b", now));
        app.update(
            vec![row("a", "ready", 1, false), row("b", "failed", 0, false)],
            now + FLASH + Duration::from_millis(1),
        );
        assert!(!app.flashing("a", now + FLASH + Duration::from_millis(1)));
    }
}
