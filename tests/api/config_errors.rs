//! The mistakes a new user makes in templates, settings and samples, met as
//! the user meets them: by running `chatbridge check` and `chatbridge render`
//! on a copy of the shipped configuration and reading what they print.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use crate::helpers::*;

const BIN: &str = env!("CARGO_BIN_EXE_chatbridge");

/// A copy of the shipped `config/`, `templates/` and `examples/`, with
/// `files` written over it (paths relative to the copy).
fn project(files: &[(&str, &str)]) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    for dir in ["config", "templates", "examples"] {
        copy_dir(&repo().join(dir), &root.path().join(dir));
    }
    for (path, text) in files {
        let path = root.path().join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    root
}

/// `chatbridge ARGS` in `root`, with no inherited `CHATBRIDGE*` variable.
fn run(root: &Path, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(root).args(args).stdin(Stdio::null());
    for (k, _) in std::env::vars() {
        if k.starts_with("CHATBRIDGE") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("run chatbridge");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&stdout),
        String::from_utf8_lossy(&stderr)
    );
    (status.success(), text)
}

fn check(root: &Path, env: &[(&str, &str)]) -> (bool, String) {
    run(root, &["check"], env)
}

fn render(root: &Path, event: &str) -> (bool, String) {
    run(root, &["render", "--source", "oms", "--event", event], &[])
}

const SHIPPED: &str = "examples/events/oms/order_shipped.json";

#[test]
fn an_object_printed_as_text_is_an_error_in_check_and_render_naming_field_line_and_column() {
    // `tracking` is an object in the shipped sample.
    let root = project(&[(
        "templates/order_shipped.hbs",
        "Заказ {{orderId}}\nТрек: {{tracking}}",
    )]);

    let (ok, out) = check(root.path(), &[]);
    assert!(!ok, "check must fail:\n{out}");
    assert!(
        out.contains("field \"tracking\" is an object") && out.contains("(line 2, column 7)"),
        "{out}"
    );
    assert!(out.contains("{{tracking.number}}") || out.contains("{{tracking.carrier}}"));

    let (ok, out) = render(root.path(), SHIPPED);
    assert!(!ok, "render must fail:\n{out}");
    assert!(!out.contains("[object]"), "{out}");
    assert!(out.contains("field \"tracking\" is an object"), "{out}");
}

#[test]
fn a_list_printed_as_text_is_an_error_and_length_suggests_len() {
    let event = r#"{"id": "e-1", "type": "order.shipped", "businessId": 111, "chatId": 5001,
                    "orderId": 1, "items": [{"sku": "A"}, {"sku": "B"}]}"#;
    let root = project(&[
        ("event.json", event),
        ("templates/order_shipped.hbs", "Товаров: {{items.length}}"),
    ]);
    let (ok, out) = render(root.path(), "event.json");
    assert!(!ok, "{out}");
    assert!(!out.contains("Cannot access array"), "{out}");
    assert!(
        out.contains("{{len items}}") && out.contains("{{items.[0]}}"),
        "{out}"
    );

    std::fs::write(
        root.path().join("templates/order_shipped.hbs"),
        "Товары: {{items}}",
    )
    .unwrap();
    let (ok, out) = render(root.path(), "event.json");
    assert!(!ok, "{out}");
    assert!(out.contains("field \"items\" is a list of 2"), "{out}");

    // What the messages suggest works.
    std::fs::write(
        root.path().join("templates/order_shipped.hbs"),
        "{{len items}}: {{items.[0].sku}}",
    )
    .unwrap();
    let (ok, out) = render(root.path(), "event.json");
    assert!(ok, "{out}");
    assert!(out.contains("\n2: A\n"), "{out}");
}

#[test]
fn an_unknown_helper_is_refused_listing_the_known_ones_and_the_closest() {
    let root = project(&[(
        "templates/return_approved.hbs",
        "Сумма: {{rubl refund.amount}}",
    )]);
    let (ok, out) = check(root.path(), &[]);
    assert!(!ok, "{out}");
    assert!(!out.contains("Helper not found"), "{out}");
    assert!(
        out.contains("return_approved.hbs: line 1, column 8: unknown helper \"rubl\""),
        "{out}"
    );
    assert!(out.contains("did you mean \"rub\""), "{out}");
    for known in [
        "rub", "date", "plural", "default", "truncate", "each", "lookup", "len",
    ] {
        assert!(out.contains(known), "{known} in {out}");
    }
}

#[test]
fn an_unknown_partial_is_refused_listing_the_known_ones() {
    let root = project(&[(
        "templates/order_delivered.hbs",
        "Заказ доставлен.\n{{> sig}}",
    )]);
    let (ok, out) = check(root.path(), &[]);
    assert!(!ok, "{out}");
    assert!(!out.contains("Partial not found"), "{out}");
    assert!(
        out.contains("order_delivered.hbs: line 2, column 1: unknown partial \"sig\"; known partials: signature"),
        "{out}"
    );
}

#[test]
fn a_wrong_log_format_names_the_key_the_value_and_the_allowed_values() {
    let shipped = std::fs::read_to_string(repo().join("config/chatbridge.toml")).unwrap();
    let settings = shipped.replace("format = \"text\"", "format = \"jsn\"");
    assert_ne!(settings, shipped);
    let root = project(&[("config/chatbridge.toml", &settings)]);
    let (ok, out) = check(root.path(), &[]);
    assert!(!ok, "{out}");
    assert!(!out.contains("variant constructor"), "{out}");
    assert!(
        out.contains("config/chatbridge.toml: log.format: \"jsn\" is not a log format; write \"text\" or \"json\""),
        "{out}"
    );
}

#[test]
fn a_mistake_in_an_environment_variable_names_the_variable_not_the_file() {
    let root = project(&[]);

    let (ok, out) = check(root.path(), &[("CHATBRIDGE__MARKET__API_KY", "abc")]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("environment variable CHATBRIDGE__MARKET__API_KY: market.api_ky: unknown field `api_ky`"),
        "{out}"
    );
    assert!(!out.contains("chatbridge.toml: unknown field"), "{out}");

    let (ok, out) = check(root.path(), &[("CHATBRIDGE__LOG__FORMAT", "jsn")]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("environment variable CHATBRIDGE__LOG__FORMAT: log.format:"),
        "{out}"
    );

    let (ok, out) = check(root.path(), &[("CHATBRIDGE__DISPATCH__CLAIM_BATCH", "0")]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("environment variable CHATBRIDGE__DISPATCH__CLAIM_BATCH:"),
        "{out}"
    );
}

#[test]
fn check_refuses_a_postgres_url_serve_could_not_use_without_showing_the_password() {
    let root = project(&[]);
    for (url, says) in [
        (
            "postgres://app:s3cret@127.0.0.1:5432/chat?sslmode=verify-full",
            "not a PostgreSQL URL: invalid value for option `sslmode`; sslmode may be disable, prefer or require (verify-ca and verify-full are not supported)",
        ),
        (
            "postgres://app:s3cret@127.0.0.1:5432/chat?sslmod=require",
            "not a PostgreSQL URL: unknown option `sslmod`",
        ),
        (
            "postgres://app:s3cret@127.0.0.1:99999/chat",
            "invalid value for option `port`; the port must be a number from 1 to 65535",
        ),
        (
            "postgresql://app:s3cret@127.0.0.1:5432",
            "it names no database: write one after the host, postgres://user@host:5432/chatbridge",
        ),
        (
            "postgres://app:s3c@ret@127.0.0.1:5432/chat",
            "the password or user name holds an @, so what follows it is read as the host; write each @ in them as %40",
        ),
    ] {
        let (ok, out) = check(root.path(), &[("CHATBRIDGE__STORAGE__URL", url)]);
        assert!(!ok, "{url}: {out}");
        assert!(
            out.contains("environment variable CHATBRIDGE__STORAGE__URL: storage.url \"postgres"),
            "{url}: {out}"
        );
        assert!(out.contains(says), "{url}: {out}");
        assert!(!out.contains("s3cret") && !out.contains("ret@"), "{url}: {out}");
    }
    // Written correctly, each is accepted (check does not connect).
    for url in [
        "postgres://app:s3c%40ret@127.0.0.1:5432/chat?sslmode=require",
        "postgresql://app@127.0.0.1/chat",
    ] {
        let (ok, out) = check(root.path(), &[("CHATBRIDGE__STORAGE__URL", url)]);
        assert!(ok, "{url}: {out}");
    }
}

#[test]
fn check_refuses_a_listen_address_serve_could_not_bind() {
    let shipped = std::fs::read_to_string(repo().join("config/chatbridge.toml")).unwrap();
    let settings = shipped.replace("\"127.0.0.1:8080\"", "\"127.0.0.1:80800\"");
    assert_ne!(settings, shipped);
    let root = project(&[("config/chatbridge.toml", &settings)]);
    let (ok, out) = check(root.path(), &[]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("config/chatbridge.toml: server.listen = \"127.0.0.1:80800\": the port \"80800\" is not a number from 0 to 65535"),
        "{out}"
    );
}

#[test]
fn check_warns_about_a_sample_event_that_no_route_matches() {
    let root = project(&[(
        "examples/events/oms/order_created.json",
        r#"{"id": "evt-2001", "type": "order.created", "businessId": 111, "chatId": 5001}"#,
    )]);
    let (ok, out) = check(root.path(), &[]);
    assert!(ok, "a warning does not fail the check:\n{out}");
    assert!(
        out.contains("warning: examples/events/oms/order_created.json: event \"order.created\" from source \"oms\" matches no route"),
        "{out}"
    );
    assert!(out.contains("1 warning(s)"), "{out}");
}

#[test]
fn check_says_once_that_the_examples_folder_is_missing() {
    let root = project(&[]);
    let (ok, out) = run(root.path(), &["check", "--examples", "exmples/events"], &[]);
    assert!(!ok, "{out}");
    assert_eq!(
        out,
        "exmples/events: examples folder not found (pass --examples DIR: a folder with one subfolder of *.json sample events per source)\n1 problem(s) found\n"
    );
}

#[test]
fn render_shows_a_trailing_newline() {
    let root = project(&[("templates/order_shipped.hbs", "Заказ {{orderId}}\n")]);
    let (ok, out) = render(root.path(), SHIPPED);
    assert!(ok, "{out}");
    assert!(out.contains("15 characters:\nЗаказ 51234567⏎\n"), "{out}");
    assert!(out.contains("ends with 1 line break(s)"), "{out}");

    let root = project(&[("templates/order_shipped.hbs", "Заказ {{orderId}}")]);
    let (ok, out) = render(root.path(), SHIPPED);
    assert!(ok, "{out}");
    assert!(!out.contains('⏎'), "{out}");
}
