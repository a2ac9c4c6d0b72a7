//! The web console driven in a real headless Chromium through chromedriver
//! (WebDriver), against the real service and the fake Market on loopback.
//! Without Chromium installed these tests print SKIP and pass, except
//! under CI (`CI=true`), where they fail: `.ci/run` installs it.

#[allow(dead_code)]
#[path = "../api/helpers.rs"]
mod helpers;

mod browser;
mod console;
