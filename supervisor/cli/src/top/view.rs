//! Draws the `top` screen: a header, the plugin table, the detail pane of
//! the selected plugin, and a status line (keys, a confirmation, the filter
//! being typed, or the last outcome).

use super::app::App;
use super::model::{self, Column};
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row, Table, TableState};
use std::time::Instant;

const WIDTHS: [u16; 13] = [18, 12, 8, 8, 8, 6, 9, 8, 6, 8, 8, 8, 6];

pub fn draw(frame: &mut Frame<'_>, app: &App, control: &str, error: Option<&str>) {
    let now = Instant::now();
    let detail_height = if app.detail { 14 } else { 0 };
    let [header, table_area, detail_area, status] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(3),
        Constraint::Length(detail_height),
        Constraint::Length(1),
    ])
    .areas(frame.area());

    let rows = app.visible();
    let arrow = if app.descending { "▼" } else { "▲" };
    let mut title = format!(
        "plugvisor top — {control} — {}/{} plugins — sort {} {arrow}",
        rows.len(),
        app.total(),
        app.sort.title()
    );
    if !app.filter.is_empty() || app.editing_filter {
        title.push_str(&format!(" — filter `{}`", app.filter));
    }
    frame.render_widget(
        Paragraph::new(title).style(Style::new().add_modifier(Modifier::BOLD)),
        header,
    );

    let head = Row::new(Column::ALL.iter().map(|c| {
        let style = if *c == app.sort {
            Style::new()
                .add_modifier(Modifier::BOLD)
                .add_modifier(Modifier::UNDERLINED)
        } else {
            Style::new().add_modifier(Modifier::BOLD)
        };
        Cell::from(c.title()).style(style)
    }));
    let mut lines = Vec::new();
    let mut selected_line = None;
    for row in &rows {
        if app.selected.as_deref() == Some(row.name.as_str()) {
            selected_line = Some(lines.len());
        }
        let mut cells = model::cells(row);
        let flashing = app.flashing(&row.name, now);
        if flashing {
            cells[0] = format!("! {}", cells[0]);
        }
        let mut line = Row::new(cells.into_iter().enumerate().map(|(i, text)| {
            let cell = Cell::from(text);
            if i == 1 {
                cell.style(Style::new().fg(state_color(&row.state)))
            } else {
                cell
            }
        }));
        if row.state == "failed" {
            line = line.style(Style::new().fg(Color::Red).add_modifier(Modifier::BOLD));
        }
        if flashing {
            line = line.style(
                Style::new()
                    .bg(Color::Yellow)
                    .fg(Color::Black)
                    .add_modifier(Modifier::BOLD),
            );
        }
        lines.push(line);
        if app.expanded {
            for r in &row.replicas {
                lines.push(Row::new(
                    model::replica_cells(r)
                        .into_iter()
                        .enumerate()
                        .map(|(i, text)| {
                            let cell = Cell::from(text);
                            if i == 1 {
                                cell.style(Style::new().fg(state_color(&r.state)))
                            } else {
                                cell.style(Style::new().add_modifier(Modifier::DIM))
                            }
                        }),
                ));
            }
        }
    }
    let table = Table::new(lines, WIDTHS.map(Constraint::Length))
        .header(head)
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED));
    let mut state = TableState::default().with_selected(selected_line);
    frame.render_stateful_widget(table, table_area, &mut state);

    if app.detail {
        draw_detail(frame, app, detail_area);
    }

    let status_line = if let Some(action) = &app.confirm {
        Line::from(Span::styled(
            format!("{}? [y/N]", capitalize(&action.describe())),
            Style::new().fg(Color::Black).bg(Color::Yellow),
        ))
    } else if app.editing_filter {
        Line::from(format!(
            "filter (name or state): {}_   Enter keep, Esc clear",
            app.filter
        ))
    } else if let Some(error) = error {
        Line::from(Span::styled(
            error.to_string(),
            Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        ))
    } else if let Some(message) = &app.message {
        Line::from(message.clone())
    } else {
        Line::from(
            "q quit  ↑↓ select  Enter details  e replicas  / filter  1-9,0 ←→ sort  i invert  r restart  x stop  s start",
        )
    };
    frame.render_widget(Paragraph::new(status_line), status);
}

fn draw_detail(frame: &mut Frame<'_>, app: &App, area: ratatui::layout::Rect) {
    let name = app.selected.as_deref().unwrap_or("-");
    let [events_area, logs_area] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(area);
    let rows = events_area.height.saturating_sub(2) as usize;
    let events: Vec<Line<'_>> = app
        .events
        .iter()
        .rev()
        .take(rows)
        .rev()
        .map(|e| {
            Line::from(vec![
                Span::raw(format!("{} ", crate::progress::clock(e.time_ms))),
                Span::styled(
                    format!("{:<13}", e.state),
                    Style::new().fg(state_color(&e.state)),
                ),
                Span::raw(e.reason.clone()),
            ])
        })
        .collect();
    frame.render_widget(
        Paragraph::new(events).block(
            Block::new()
                .borders(Borders::ALL)
                .title(format!(" {name}: events ")),
        ),
        events_area,
    );
    let rows = logs_area.height.saturating_sub(2) as usize;
    let logs: Vec<Line<'_>> = app
        .logs
        .iter()
        .rev()
        .take(rows)
        .rev()
        .map(|l| {
            let style = if l.stream == "stderr" {
                Style::new().fg(Color::Yellow)
            } else {
                Style::new()
            };
            Line::from(Span::styled(format!("{} {}", l.instance, l.line), style))
        })
        .collect();
    frame.render_widget(
        Paragraph::new(logs).block(
            Block::new()
                .borders(Borders::ALL)
                .title(format!(" {name}: logs ")),
        ),
        logs_area,
    );
}

/// The colour of a state, as `events` prints it on a terminal.
fn state_color(state: &str) -> Color {
    match state {
        "ready" => Color::Green,
        "degraded" => Color::Yellow,
        "starting" | "initializing" => Color::Cyan,
        "backoff" | "stopping" => Color::Magenta,
        "failed" => Color::Red,
        _ => Color::DarkGray,
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(first) => first.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}
