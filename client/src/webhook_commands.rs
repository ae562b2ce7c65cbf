//! The webhook commands: `ferry webhooks …`, `ferry events send` and `ferry
//! event-types`, printing for people (or JSON with `--json`). They only
//! talk to a running relay's API, since the dispatcher runs there; input
//! is checked before the relay is asked, so a typo fails the same way with
//! or without one.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use clap::{Args, Subcommand};
use ferry::webhooks::DeliveryQuery;
use ferry_common::api::{DeliveryView, EventInput, TestEventInput, WebhookInput, WebhookView};
use http::{HeaderName, HeaderValue};

use crate::commands::inert;
use crate::SourceArgs;

/// `ferry webhooks`.
#[derive(Args, Debug)]
pub struct WebhooksArgs {
    #[command(subcommand)]
    command: WebhooksCommand,
}

#[derive(Subcommand, Debug)]
enum WebhooksCommand {
    /// List the webhooks: a line each.
    List(ListArgs),
    /// Create a webhook; prints its id and signing secret.
    Create(CreateArgs),
    /// Change a webhook; what is not given keeps its value.
    Update(UpdateArgs),
    /// Delete a webhook.
    Delete(IdArgs),
    /// Give a webhook a new signing secret and print it; the previous one
    /// still signs for a while, so receivers can switch over.
    RotateSecret(IdArgs),
    /// Send a webhook an example event.
    Test(TestArgs),
    /// List a webhook's deliveries, newest last: a line each.
    Deliveries(DeliveriesArgs),
    /// Send a delivery again.
    Resend(ResendArgs),
    /// Queue again a webhook's deliveries that failed.
    Recover(RecoverArgs),
}

#[derive(Args, Debug)]
struct ListArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// A JSON object per line instead of text.
    #[arg(long)]
    json: bool,
}

/// The fields `create` and `update` both take, optional in both.
#[derive(Args, Debug)]
struct Fields {
    /// The method deliveries use: POST (the default), PUT, PATCH, GET or
    /// DELETE.
    #[arg(long)]
    method: Option<String>,
    /// A header every delivery carries, `name: value` (repeatable). With
    /// `update`, the headers given replace all the old ones.
    #[arg(long = "header", value_name = "NAME: VALUE", value_parser = header_field)]
    headers: Vec<(String, String)>,
    /// The signing secret: `whsec_` and the base64 of 24 to 64 bytes.
    /// `create` generates one when left out.
    #[arg(long, value_name = "SECRET")]
    secret: Option<String>,
}

#[derive(Args, Debug)]
struct CreateArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// A name of your choosing.
    #[arg(long)]
    name: String,
    /// Where deliveries go: an http(s) URL.
    #[arg(long)]
    url: String,
    /// An event type it listens to, or a wildcard (`*`, `document.*`);
    /// repeatable, or comma-separated.
    #[arg(
        long = "action",
        value_name = "TYPE",
        required = true,
        value_delimiter = ','
    )]
    actions: Vec<String>,
    #[command(flatten)]
    fields: Fields,
    /// Create it disabled: events queue nothing for it until `ferry
    /// webhooks update ID --enable`.
    #[arg(long)]
    disabled: bool,
    /// One delivery in flight at a time, in event order.
    #[arg(long)]
    ordered: bool,
    /// The webhook as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
#[command(group(
    clap::ArgGroup::new("change")
        .required(true)
        .multiple(true)
        .args(["name", "url", "actions", "method", "headers", "secret", "clear_headers", "enable", "disable", "ordered", "unordered"])
))]
struct UpdateArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// The webhook's id (`wh_…`).
    id: String,
    /// A new name.
    #[arg(long)]
    name: Option<String>,
    /// A new URL.
    #[arg(long)]
    url: Option<String>,
    /// The event types it listens to, in place of the old ones; repeatable,
    /// or comma-separated.
    #[arg(long = "action", value_name = "TYPE", value_delimiter = ',')]
    actions: Vec<String>,
    #[command(flatten)]
    fields: Fields,
    /// Remove every header it adds.
    #[arg(long, conflicts_with = "headers")]
    clear_headers: bool,
    /// Let events queue deliveries for it again.
    #[arg(long, conflicts_with = "disable")]
    enable: bool,
    /// Stop events from queueing deliveries for it.
    #[arg(long)]
    disable: bool,
    /// One delivery in flight at a time, in event order.
    #[arg(long, conflicts_with = "unordered")]
    ordered: bool,
    /// Deliveries in flight side by side.
    #[arg(long)]
    unordered: bool,
    /// The webhook as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct IdArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// The webhook's id (`wh_…`).
    id: String,
    /// The answer as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct TestArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// The webhook's id (`wh_…`).
    id: String,
    /// The event type whose example is sent. Default: the first type the
    /// webhook listens to.
    #[arg(long = "type", value_name = "TYPE")]
    kind: Option<String>,
    /// The answer as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct DeliveriesArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// The webhook's id (`wh_…`).
    id: String,
    /// Only deliveries in this state.
    #[arg(long, value_parser = ["pending", "succeeded", "failed"])]
    state: Option<String>,
    /// Only deliveries older than this cursor, which a full page ends with.
    #[arg(long, value_name = "CURSOR")]
    before: Option<String>,
    /// How many of the newest.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    limit: Option<u32>,
    /// A JSON object per line instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct ResendArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// The delivery's id (`msg_…`), as `ferry webhooks deliveries` prints it.
    id: String,
    /// The delivery as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct RecoverArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// The webhook's id (`wh_…`).
    id: String,
    /// The deliveries that failed since then: an RFC 3339 time, or a
    /// duration (1h for an hour ago).
    #[arg(long, value_name = "WHEN")]
    since: String,
    /// The answer as JSON.
    #[arg(long)]
    json: bool,
}

/// `ferry events`.
#[derive(Args, Debug)]
pub struct EventsArgs {
    #[command(subcommand)]
    command: EventsCommand,
}

#[derive(Subcommand, Debug)]
enum EventsCommand {
    /// Send an event: each enabled webhook listening to its type gets a
    /// delivery.
    Send(SendArgs),
}

#[derive(Args, Debug)]
struct SendArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// The event type, such as document.create (`ferry event-types` lists
    /// them).
    #[arg(value_name = "TYPE")]
    kind: String,
    /// The payload: JSON, or @FILE for a file's JSON. Default: {}.
    #[arg(long, value_name = "JSON|@FILE")]
    data: Option<String>,
    /// Your id for the event: the same id again within a day queues
    /// nothing new.
    #[arg(long)]
    id: Option<String>,
    /// The answer as JSON.
    #[arg(long)]
    json: bool,
}

/// `ferry event-types`.
#[derive(Args, Debug)]
pub struct EventTypesArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// A JSON object per line instead of text.
    #[arg(long)]
    json: bool,
}

/// `--header 'name: value'`, checked here so that a typo is a usage error
/// rather than a webhook whose every delivery fails.
fn header_field(text: &str) -> Result<(String, String), String> {
    let (name, value) = text
        .split_once(':')
        .ok_or_else(|| format!("`{text}` is not `name: value`"))?;
    let (name, value) = (name.trim(), value.trim());
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("`{name}` is not a header name"))?;
    HeaderValue::from_str(value)
        .map_err(|_| format!("the value of `{name}` holds characters a header cannot"))?;
    Ok((name.to_ascii_lowercase(), value.to_owned()))
}

/// The `--header`s as the API's map; a name given twice is an error, not
/// a silent choice of one value.
fn header_map(headers: &[(String, String)]) -> Result<BTreeMap<String, String>, String> {
    let mut map = BTreeMap::new();
    for (name, value) in headers {
        if map.insert(name.clone(), value.clone()).is_some() {
            return Err(format!("--header `{name}` is given twice"));
        }
    }
    Ok(map)
}

/// The `--action`s, trimmed, so that `--action 'a, b'` means `a` and `b`.
fn actions(given: &[String]) -> Vec<String> {
    given
        .iter()
        .map(|action| action.trim().to_owned())
        .filter(|action| !action.is_empty())
        .collect()
}

/// `--data`: JSON text, or `@FILE` for a file's JSON; `{}` when left out.
fn event_data(data: Option<&str>) -> Result<serde_json::Value, String> {
    let Some(data) = data else {
        return Ok(serde_json::Value::Object(serde_json::Map::new()));
    };
    match data.strip_prefix('@') {
        Some(path) => {
            let bytes =
                std::fs::read(path).map_err(|err| format!("cannot read --data @{path}: {err}"))?;
            serde_json::from_slice(&bytes)
                .map_err(|err| format!("--data @{path} does not hold JSON: {err}"))
        }
        None => serde_json::from_str(data).map_err(|err| {
            format!("--data is not JSON: {err} (pass JSON such as '{{\"id\": 1}}', or @FILE)")
        }),
    }
}

/// `n delivery` or `n deliveries`.
fn deliveries_count(n: usize) -> String {
    if n == 1 {
        "1 delivery".to_owned()
    } else {
        format!("{n} deliveries")
    }
}

/// Rows as columns, each padded to its widest cell, the last unpadded.
/// Cells are made inert first, so that the padding counts what is shown.
fn table(rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            row.iter()
                .map(|cell| inert(cell).replace('\n', " "))
                .collect()
        })
        .collect();
    let mut widths: Vec<usize> = Vec::new();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            let width = cell.chars().count();
            match widths.get_mut(i) {
                Some(max) => *max = (*max).max(width),
                None => widths.push(width),
            }
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let width = widths.get(i).copied().unwrap_or(0);
                let _ = write!(line, "{cell:<width$}  ");
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

fn yes_no(value: bool) -> String {
    if value { "yes" } else { "no" }.to_owned()
}

/// A webhook as `key: value` lines; its secret only when `with_secret`.
fn describe(webhook: &WebhookView, with_secret: bool) -> String {
    let headers: Vec<String> = webhook
        .headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}"))
        .collect();
    let mut rows = vec![
        vec!["id:".to_owned(), webhook.id.clone()],
        vec!["name:".to_owned(), webhook.name.clone()],
        vec!["method:".to_owned(), webhook.method.clone()],
        vec!["url:".to_owned(), webhook.url.clone()],
        vec!["actions:".to_owned(), webhook.actions.join(", ")],
        vec!["headers:".to_owned(), headers.join("; ")],
        vec!["enabled:".to_owned(), yes_no(webhook.enabled)],
        vec!["ordered:".to_owned(), yes_no(webhook.ordered)],
    ];
    if let Some(reason) = &webhook.disabled_reason {
        rows.push(vec!["disabled by the relay:".to_owned(), reason.clone()]);
    }
    if with_secret {
        rows.push(vec!["secret:".to_owned(), webhook.secret.clone()]);
    }
    table(&rows)
}

fn print_pretty(value: &impl serde::Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

fn print_line(value: &impl serde::Serialize) {
    println!("{}", serde_json::to_string(value).unwrap_or_default());
}

/// What a delivery's last attempt met, and when the next is due.
fn last_outcome(delivery: &DeliveryView) -> String {
    let mut parts = Vec::new();
    if let Some(status) = delivery.last_status {
        parts.push(status.to_string());
    }
    if let Some(error) = &delivery.last_error {
        parts.push(error.clone());
    }
    if let Some(next) = &delivery.next_attempt_at {
        parts.push(format!("next attempt {next}"));
    }
    if parts.is_empty() {
        "-".to_owned()
    } else {
        parts.join("  ")
    }
}

/// `ferry webhooks …`.
pub async fn webhooks(args: WebhooksArgs) -> Result<(), String> {
    match args.command {
        WebhooksCommand::List(args) => list(args).await,
        WebhooksCommand::Create(args) => create(args).await,
        WebhooksCommand::Update(args) => update(args).await,
        WebhooksCommand::Delete(args) => delete(args).await,
        WebhooksCommand::RotateSecret(args) => rotate_secret(args).await,
        WebhooksCommand::Test(args) => test(args).await,
        WebhooksCommand::Deliveries(args) => deliveries(args).await,
        WebhooksCommand::Resend(args) => resend(args).await,
        WebhooksCommand::Recover(args) => recover(args).await,
    }
}

async fn list(args: ListArgs) -> Result<(), String> {
    let list = args
        .source
        .api()?
        .webhooks()
        .await
        .map_err(|err| err.to_string())?;
    if args.json {
        list.items.iter().for_each(print_line);
        return Ok(());
    }
    if list.items.is_empty() {
        println!("no webhooks yet: add one with `ferry webhooks create`");
        return Ok(());
    }
    let mut rows = vec![[
        "ID",
        "NAME",
        "METHOD",
        "URL",
        "ACTIONS",
        "ENABLED",
        "LAST DELIVERY",
    ]
    .map(str::to_owned)
    .to_vec()];
    for webhook in &list.items {
        rows.push(vec![
            webhook.id.clone(),
            webhook.name.clone(),
            webhook.method.clone(),
            webhook.url.clone(),
            webhook.actions.join(","),
            yes_no(webhook.enabled),
            webhook
                .last_delivery
                .clone()
                .unwrap_or_else(|| "-".to_owned()),
        ]);
    }
    let mut out = table(&rows);
    for webhook in &list.items {
        if let Some(reason) = &webhook.disabled_reason {
            let _ = writeln!(
                out,
                "{} was disabled by the relay: {}",
                inert(&webhook.id),
                inert(reason)
            );
        } else if let Some(since) = &webhook.failing_since {
            let _ = writeln!(
                out,
                "{} has failed every delivery since {}",
                inert(&webhook.id),
                inert(since)
            );
        }
    }
    print!("{out}");
    Ok(())
}

async fn create(args: CreateArgs) -> Result<(), String> {
    let input = WebhookInput {
        name: Some(args.name),
        method: args.fields.method,
        url: Some(args.url),
        actions: Some(actions(&args.actions)),
        headers: Some(header_map(&args.fields.headers)?).filter(|map| !map.is_empty()),
        enabled: args.disabled.then_some(false),
        ordered: args.ordered.then_some(true),
        secret: args.fields.secret,
    };
    let webhook = args
        .source
        .api()?
        .create_webhook(&input)
        .await
        .map_err(|err| err.to_string())?;
    if args.json {
        print_pretty(&webhook);
    } else {
        print!("{}", describe(&webhook, true));
    }
    Ok(())
}

async fn update(args: UpdateArgs) -> Result<(), String> {
    let headers = if args.clear_headers {
        Some(BTreeMap::new())
    } else {
        Some(header_map(&args.fields.headers)?).filter(|map| !map.is_empty())
    };
    let input = WebhookInput {
        name: args.name,
        method: args.fields.method,
        url: args.url,
        actions: (!args.actions.is_empty()).then(|| actions(&args.actions)),
        headers,
        enabled: match (args.enable, args.disable) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        },
        ordered: match (args.ordered, args.unordered) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        },
        secret: args.fields.secret,
    };
    let webhook = args
        .source
        .api()?
        .update_webhook(&args.id, &input)
        .await
        .map_err(|err| err.to_string())?;
    if args.json {
        print_pretty(&webhook);
    } else {
        print!("{}", describe(&webhook, false));
    }
    Ok(())
}

async fn delete(args: IdArgs) -> Result<(), String> {
    args.source
        .api()?
        .delete_webhook(&args.id)
        .await
        .map_err(|err| err.to_string())?;
    if args.json {
        print_line(&serde_json::json!({ "deleted": args.id }));
    } else {
        println!("deleted {}", inert(&args.id));
    }
    Ok(())
}

async fn rotate_secret(args: IdArgs) -> Result<(), String> {
    let webhook = args
        .source
        .api()?
        .rotate_secret(&args.id)
        .await
        .map_err(|err| err.to_string())?;
    if args.json {
        print_pretty(&webhook);
        return Ok(());
    }
    let mut out = format!("secret: {}\n", webhook.secret);
    if let Some(until) = &webhook.previous_secret_until {
        let _ = writeln!(out, "the previous secret also signs until {until}");
    }
    print!("{}", inert(&out));
    Ok(())
}

async fn test(args: TestArgs) -> Result<(), String> {
    let input = TestEventInput { kind: args.kind };
    let accepted = args
        .source
        .api()?
        .test_webhook(&args.id, &input)
        .await
        .map_err(|err| err.to_string())?;
    if args.json {
        print_pretty(&accepted);
    } else {
        println!(
            "test event {}: {} queued",
            inert(&accepted.id),
            deliveries_count(accepted.queued)
        );
    }
    Ok(())
}

async fn deliveries(args: DeliveriesArgs) -> Result<(), String> {
    let query = DeliveryQuery {
        state: args.state,
        before: args.before,
        limit: args.limit,
    };
    let page = args
        .source
        .api()?
        .deliveries(&args.id, &query)
        .await
        .map_err(|err| err.to_string())?;
    // Oldest at the top, as `ferry log` prints.
    if args.json {
        page.items.iter().rev().for_each(print_line);
    } else if page.items.is_empty() {
        println!("no deliveries");
    } else {
        let mut rows = vec![["CREATED", "ID", "EVENT TYPE", "STATE", "ATTEMPTS", "LAST"]
            .map(str::to_owned)
            .to_vec()];
        for delivery in page.items.iter().rev() {
            rows.push(vec![
                delivery.created_at.clone(),
                delivery.id.clone(),
                delivery.event_type.clone(),
                delivery.state.clone(),
                delivery.attempts.to_string(),
                last_outcome(delivery),
            ]);
        }
        print!("{}", table(&rows));
    }
    if let Some(cursor) = page.next_cursor {
        eprintln!("older deliveries: --before {}", inert(&cursor));
    }
    Ok(())
}

async fn resend(args: ResendArgs) -> Result<(), String> {
    let delivery = args
        .source
        .api()?
        .resend(&args.id)
        .await
        .map_err(|err| err.to_string())?;
    if args.json {
        print_pretty(&delivery);
    } else {
        println!(
            "{}",
            inert(&format!(
                "resending {} ({}) to {}: {}",
                delivery.id, delivery.event_type, delivery.webhook_id, delivery.state
            ))
        );
    }
    Ok(())
}

async fn recover(args: RecoverArgs) -> Result<(), String> {
    let recovered = args
        .source
        .api()?
        .recover(&args.id, &args.since)
        .await
        .map_err(|err| err.to_string())?;
    if args.json {
        print_pretty(&recovered);
    } else {
        println!(
            "{} that failed queued again",
            deliveries_count(recovered.queued)
        );
    }
    Ok(())
}

/// `ferry events …`.
pub async fn events(args: EventsArgs) -> Result<(), String> {
    let EventsCommand::Send(args) = args.command;
    let input = EventInput {
        kind: args.kind,
        data: event_data(args.data.as_deref())?,
        id: args.id,
    };
    let accepted = args
        .source
        .api()?
        .send_event(&input)
        .await
        .map_err(|err| err.to_string())?;
    if args.json {
        print_pretty(&accepted);
    } else if accepted.duplicate {
        println!(
            "event {}: a duplicate (its id was sent within a day), nothing queued",
            inert(&accepted.id)
        );
    } else {
        println!(
            "event {}: {} queued",
            inert(&accepted.id),
            deliveries_count(accepted.queued)
        );
    }
    Ok(())
}

/// `ferry event-types`.
pub async fn event_types(args: EventTypesArgs) -> Result<(), String> {
    let list = args
        .source
        .api()?
        .event_types()
        .await
        .map_err(|err| err.to_string())?;
    if args.json {
        list.items.iter().for_each(print_line);
        return Ok(());
    }
    let mut rows = vec![vec!["NAME".to_owned(), "DESCRIPTION".to_owned()]];
    for kind in &list.items {
        rows.push(vec![kind.name.clone(), kind.description.clone()]);
    }
    print!("{}", table(&rows));
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use clap::{CommandFactory, Parser};

    use super::{
        actions, event_data, header_field, header_map, table, WebhooksArgs, WebhooksCommand,
    };
    use crate::{Cli, Command};

    /// The `ferry webhooks …` arguments `args` parse to.
    fn webhooks(args: &[&str]) -> Result<WebhooksCommand, clap::Error> {
        let mut all = vec!["ferry", "webhooks"];
        all.extend_from_slice(args);
        match Cli::try_parse_from(all)?.command {
            Command::Webhooks(WebhooksArgs { command }) => Ok(command),
            other => panic!("not `webhooks`: {other:?}"),
        }
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn actions_repeat_or_split_at_commas_and_headers_parse_into_pairs() {
        let parsed = webhooks(&[
            "create",
            "--name",
            "n",
            "--url",
            "http://x/",
            "--action",
            "a.b,c.*",
            "--action",
            "d",
            "--header",
            "X-A: 1",
            "--header",
            "x-b:2",
        ]);
        let Ok(WebhooksCommand::Create(args)) = parsed else {
            panic!("create: {parsed:?}");
        };
        assert_eq!(args.actions, ["a.b", "c.*", "d"]);
        assert_eq!(
            args.fields.headers,
            [
                ("x-a".to_owned(), "1".to_owned()),
                ("x-b".to_owned(), "2".to_owned())
            ]
        );
        assert!(!args.disabled && !args.ordered);
    }

    #[test]
    fn update_needs_a_change_and_refuses_contradictions() {
        let err = webhooks(&["update", "wh_1"]).expect_err("no change");
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        for contradiction in [
            &["--enable", "--disable"][..],
            &["--ordered", "--unordered"],
            &["--clear-headers", "--header", "x-a: 1"],
        ] {
            let mut args = vec!["update", "wh_1"];
            args.extend_from_slice(contradiction);
            let err = webhooks(&args).expect_err("a contradiction");
            assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
        }
        let parsed = webhooks(&["update", "wh_1", "--disable"]);
        assert!(
            matches!(&parsed, Ok(WebhooksCommand::Update(args)) if args.disable && !args.enable),
            "{parsed:?}"
        );
    }

    #[test]
    fn a_bad_header_or_state_is_a_usage_error() {
        let err = webhooks(&[
            "create", "--name", "n", "--url", "u", "--action", "a", "--header", "nocolon",
        ])
        .expect_err("a bad header");
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        assert!(err.to_string().contains("is not `name: value`"), "{err}");
        let err = webhooks(&["deliveries", "wh_1", "--state", "lost"]).expect_err("a bad state");
        assert_eq!(err.kind(), clap::error::ErrorKind::InvalidValue);
    }

    #[test]
    fn a_header_is_a_name_and_a_value_around_the_first_colon() {
        assert_eq!(
            header_field("X-Auth:  Bearer a:b "),
            Ok(("x-auth".to_owned(), "Bearer a:b".to_owned()))
        );
        assert_eq!(
            header_field("x-empty:"),
            Ok(("x-empty".to_owned(), String::new()))
        );
    }

    #[test]
    fn a_malformed_header_says_what_is_wrong() {
        let err = header_field("no colon").expect_err("no colon");
        assert!(err.contains("is not `name: value`"), "{err}");
        let err = header_field(": value").expect_err("no name");
        assert!(err.contains("is not a header name"), "{err}");
        let err = header_field("two words: x").expect_err("a space in the name");
        assert!(err.contains("`two words` is not a header name"), "{err}");
        let err = header_field("x-a: line\u{1}break").expect_err("a control character");
        assert!(err.contains("the value of `x-a`"), "{err}");
    }

    #[test]
    fn a_header_given_twice_is_refused() {
        let twice = [
            ("x-a".to_owned(), "1".to_owned()),
            ("x-a".to_owned(), "2".to_owned()),
        ];
        let err = header_map(&twice).expect_err("twice");
        assert!(err.contains("`x-a` is given twice"), "{err}");
        let map = header_map(&twice[..1]).expect("once");
        assert_eq!(map.get("x-a").map(String::as_str), Some("1"));
    }

    #[test]
    fn actions_are_trimmed_and_empty_ones_dropped() {
        let given = [
            "document.create".to_owned(),
            " invoice.* ".to_owned(),
            " ".to_owned(),
        ];
        assert_eq!(actions(&given), ["document.create", "invoice.*"]);
    }

    #[test]
    fn event_data_is_inline_json_or_a_files_json_and_an_object_by_default() {
        assert_eq!(event_data(None), Ok(serde_json::json!({})));
        assert_eq!(
            event_data(Some(r#"{"title": "x", "n": [1, 2]}"#)),
            Ok(serde_json::json!({"title": "x", "n": [1, 2]}))
        );
        assert_eq!(event_data(Some("42")), Ok(serde_json::json!(42)));
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(br#"{"from": "a file"}"#).expect("write");
        let arg = format!("@{}", file.path().display());
        assert_eq!(
            event_data(Some(&arg)),
            Ok(serde_json::json!({"from": "a file"}))
        );
    }

    #[test]
    fn bad_event_data_says_which_and_why() {
        let err = event_data(Some("{title: x}")).expect_err("not JSON");
        assert!(err.starts_with("--data is not JSON: "), "{err}");
        let dir = tempfile::tempdir().expect("temp dir");
        let missing = dir.path().join("missing.json");
        let err = event_data(Some(&format!("@{}", missing.display()))).expect_err("no file");
        assert!(err.starts_with("cannot read --data @"), "{err}");
        assert!(err.contains("missing.json"), "{err}");
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, b"\xff not json").expect("write");
        let err = event_data(Some(&format!("@{}", bad.display()))).expect_err("bad file");
        assert!(err.contains("does not hold JSON"), "{err}");
    }

    #[test]
    fn a_table_pads_what_is_shown_and_shows_no_controls() {
        let rows = [
            vec!["ID".to_owned(), "NAME".to_owned(), "URL".to_owned()],
            vec![
                "wh_1".to_owned(),
                "evil\u{1b}[2J".to_owned(),
                "http://a".to_owned(),
            ],
            vec!["wh_22".to_owned(), "b".to_owned(), "http://b".to_owned()],
        ];
        let shown = table(&rows);
        assert!(!shown.contains('\u{1b}'), "{shown}");
        let lines: Vec<&str> = shown.lines().collect();
        assert_eq!(lines[0], "ID     NAME             URL");
        assert_eq!(lines[1], "wh_1   evil\\u{001b}[2J  http://a");
        assert_eq!(lines[2], "wh_22  b                http://b");
    }
}
