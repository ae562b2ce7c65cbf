//! Debian's headless Chromium, driven over WebDriver by `chromedriver`.
//! A test that finds neither fails and says how to install them.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use ferry_tests::{within, PATIENCE};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

/// One browser with its own profile, closed when the test ends.
pub struct Browser {
    client: Client,
    /// The WebDriver server; killed when dropped.
    _driver: Child,
    _profile: tempfile::TempDir,
    /// The test's name, for its screenshots.
    name: String,
}

impl Browser {
    /// Starts chromedriver on a free port and a browser in `scheme`
    /// (`light` or `dark`) through it.
    pub async fn start(name: &str, scheme: &str) -> Self {
        for program in [CHROMEDRIVER, CHROMIUM] {
            assert!(
                std::path::Path::new(program).exists(),
                "{program} is missing: install Debian's chromium and chromium-driver (apt-get install chromium chromium-driver), as ./scripts/test does on Debian"
            );
        }
        let mut driver = Command::new(CHROMEDRIVER)
            .arg("--port=0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        let stdout = driver.stdout.take().expect("piped stdout");
        let port = within("chromedriver says its port", async {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(port) = line
                    .split("started successfully on port ")
                    .nth(1)
                    .and_then(|rest| rest.trim_end_matches('.').trim().parse::<u16>().ok())
                {
                    return port;
                }
            }
            panic!("chromedriver ended without saying its port");
        })
        .await;
        // The WebDriver client's HTTPS stack asks for the process default,
        // and the build holds two providers.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let profile = tempfile::tempdir().expect("a browser profile directory");
        let mut args = vec![
            "--headless=new".to_owned(),
            // CI runs as root, where Chromium's sandbox cannot start.
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            // The machine's network is closed: no calls home.
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--no-first-run".to_owned(),
            "--window-size=1366,860".to_owned(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        if scheme == "dark" {
            args.push("--force-dark-mode".to_owned());
            args.push("--blink-settings=preferredColorScheme=0".to_owned());
        }
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".to_owned(),
            serde_json::json!({ "binary": CHROMIUM, "args": args }),
        );
        let client = within(
            "a browser session starts",
            ClientBuilder::rustls()
                .expect("a WebDriver client")
                .capabilities(capabilities)
                .connect(&format!("http://127.0.0.1:{port}")),
        )
        .await
        .expect("chromedriver starts a Chromium session");
        Self {
            client,
            _driver: driver,
            _profile: profile,
            name: name.to_owned(),
        }
    }

    /// Opens `url`.
    pub async fn goto(&self, url: &str) {
        self.client.goto(url).await.expect("the page opens");
    }

    /// Waits for the element at `xpath`; on timeout saves a screenshot
    /// and fails.
    pub async fn wait(&self, what: &str, xpath: &str) -> Element {
        let found = self
            .client
            .wait()
            .at_most(PATIENCE)
            .every(Duration::from_millis(50))
            .for_element(Locator::XPath(xpath))
            .await;
        match found {
            Ok(element) => element,
            Err(err) => {
                self.screenshot("failed").await;
                panic!(
                    "{what}: {xpath} never appeared ({err}); see {}",
                    self.shot_path("failed").display()
                );
            }
        }
    }

    /// The element with `id`, once it is there.
    pub async fn id(&self, id: &str) -> Element {
        self.wait(id, &format!("//*[@id='{id}']")).await
    }

    /// Waits until the element with `id` contains `text`.
    pub async fn id_with(&self, id: &str, text: &str) -> Element {
        self.wait(
            &format!("#{id} shows {text}"),
            &format!("//*[@id='{id}'][contains(., {})]", literal(text)),
        )
        .await
    }

    /// Waits for the current view to have rendered its data.
    pub async fn ready(&self) {
        self.wait("the view is ready", "//body[@data-ready='1']")
            .await;
    }

    /// Replaces the value of the input with `id`.
    pub async fn fill(&self, id: &str, value: &str) {
        let input = self.id(id).await;
        input.clear().await.expect("the input clears");
        input.send_keys(value).await.expect("the input takes keys");
    }

    /// Reloads the page.
    pub async fn reload(&self) {
        self.client.refresh().await.expect("the page reloads");
    }

    /// Clicks the element with `id`. A view that renders again between
    /// finding and clicking leaves a stale element: it is found again.
    pub async fn click(&self, id: &str) {
        within(&format!("#{id} is clicked"), async {
            loop {
                match self.id(id).await.click().await {
                    Ok(()) => return,
                    Err(err) if err.is_stale_element_reference() => tokio::task::yield_now().await,
                    Err(err) => panic!("#{id} cannot be clicked: {err}"),
                }
            }
        })
        .await;
    }

    /// Every element at `css`.
    pub async fn all(&self, css: &str) -> Vec<Element> {
        self.client
            .find_all(Locator::Css(css))
            .await
            .expect("the query runs")
    }

    /// Runs `script` in the page.
    pub async fn run(&self, script: &str) -> serde_json::Value {
        self.client
            .execute(script, Vec::new())
            .await
            .expect("the script runs")
    }

    fn shot_path(&self, step: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join("browser")
            .join(format!("{}-{step}.png", self.name))
    }

    /// Saves a screenshot of the page under `target/tmp/browser/`.
    pub async fn screenshot(&self, step: &str) -> PathBuf {
        let path = self.shot_path(step);
        self.save_screenshot(&path).await;
        path
    }

    /// Saves a screenshot of the page at `path`.
    pub async fn save_screenshot(&self, path: &std::path::Path) {
        let png = self.client.screenshot().await.expect("a screenshot");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("the screenshot directory");
        }
        std::fs::write(path, png).expect("the screenshot is written");
    }

    /// Ends the browser session.
    pub async fn close(self) {
        let _ = self.client.close().await;
    }
}

/// `text` as an XPath string literal.
fn literal(text: &str) -> String {
    if !text.contains('\'') {
        format!("'{text}'")
    } else {
        let parts: Vec<String> = text.split('\'').map(|part| format!("'{part}'")).collect();
        format!("concat({})", parts.join(", \"'\", "))
    }
}
