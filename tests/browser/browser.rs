//! Starts chromedriver and a headless Chromium with a fresh profile, and
//! helpers to log in, wait, and take the README's screenshots.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

use crate::helpers::{repo, ADMIN_TOKEN};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

pub struct Browser {
    pub client: Client,
    pub base: String,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// A browser on `base`, or `None` (after saying why) when Chromium is
    /// not installed and this is not CI.
    pub async fn start(base: &str) -> Option<Browser> {
        if !std::path::Path::new(CHROMEDRIVER).exists() || !std::path::Path::new(CHROMIUM).exists()
        {
            let why = format!(
                "{CHROMEDRIVER} or {CHROMIUM} is missing: apt-get install -y chromium chromium-driver"
            );
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("browser tests need Chromium in CI: {why}");
            }
            eprintln!("SKIP browser test: {why}");
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let url = format!("http://127.0.0.1:{port}");
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.path().display()),
                ]
            }
        });
        let caps = caps.as_object().unwrap().clone();
        // chromedriver takes a moment to listen.
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(c) => break c,
                Err(e) if Instant::now() > deadline => panic!("no WebDriver session: {e}"),
                Err(_) => actix_rt::time::sleep(Duration::from_millis(100)).await,
            }
        };
        Some(Browser {
            client,
            base: base.to_owned(),
            driver,
            _profile: profile,
        })
    }

    pub async fn goto(&self, path: &str) {
        self.client
            .goto(&format!("{}{path}", self.base))
            .await
            .expect("navigation");
    }

    pub async fn path(&self) -> String {
        self.client.current_url().await.unwrap().path().to_owned()
    }

    /// Waits (bounded) for an element to be on the page.
    pub async fn wait(&self, css: &str) -> fantoccini::elements::Element {
        self.client
            .wait()
            .at_most(Duration::from_secs(20))
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css} on the page: {e}"))
    }

    /// The text of `css`. An element the page replaced between finding it
    /// and reading it (a script re-rendering, a page still loading) is
    /// found again rather than failing the test.
    pub async fn text(&self, css: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.wait(css).await.text().await {
                Ok(text) => return text,
                Err(e) if is_stale(&e) && Instant::now() < deadline => continue,
                Err(e) => panic!("the text of {css}: {e}"),
            }
        }
    }

    /// Clicks `css` and waits for the page it leads to: a later `wait`
    /// or `text` must not find its element on the page being left (a
    /// form's submit or a link does not wait for the next page itself).
    pub async fn click_to_next_page(&self, css: &str) {
        let element = self.wait(css).await;
        self.follow(element).await;
    }

    /// Clicks `element` and waits until the page it was on is gone.
    pub async fn follow(&self, element: fantoccini::elements::Element) {
        let old_page = self.client.find(Locator::Css("html")).await.unwrap();
        element.click().await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match old_page.tag_name().await {
                Err(e) if is_stale(&e) => return,
                Err(e) => panic!("waiting for the next page: {e}"),
                Ok(_) => {
                    assert!(Instant::now() < deadline, "the click led to no new page");
                    actix_rt::time::sleep(Duration::from_millis(25)).await;
                }
            }
        }
    }

    /// The whole visible text of the page.
    pub async fn body(&self) -> String {
        self.text("body").await
    }

    pub async fn login(&self) {
        self.goto("/ui/login").await;
        self.wait("#token")
            .await
            .send_keys(ADMIN_TOKEN)
            .await
            .unwrap();
        self.click_to_next_page("#login").await;
        self.wait("#config-version").await;
    }

    /// A screenshot of the viewport. `UPDATE_SCREENSHOTS=1` writes it to
    /// docs/screenshots/<name>.png (for the README); otherwise it is taken
    /// and checked to be a PNG, then dropped.
    pub async fn screenshot(&self, name: &str) {
        // The page from its top, whatever had the focus.
        self.client
            .execute(
                "window.scrollTo(0, 0); document.activeElement.blur();",
                vec![],
            )
            .await
            .unwrap();
        let png = self.client.screenshot().await.expect("screenshot");
        assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
        if std::env::var("UPDATE_SCREENSHOTS").is_ok_and(|v| v == "1") {
            let path: PathBuf = repo().join("docs/screenshots").join(format!("{name}.png"));
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, png).unwrap();
        }
    }

    /// A screenshot as a phone would show the page (390 px wide).
    pub async fn phone_screenshot(&self, name: &str) {
        self.client.set_window_size(390, 844).await.unwrap();
        self.screenshot(name).await;
        self.client.set_window_size(1280, 900).await.unwrap();
    }

    pub async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // A failed test must not leave chromedriver running.
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// The page no longer holds the element (it was replaced, or the page left).
fn is_stale(error: &fantoccini::error::CmdError) -> bool {
    matches!(
        error,
        fantoccini::error::CmdError::Standard(e)
            if e.error == fantoccini::error::ErrorStatus::StaleElementReference
    )
}
