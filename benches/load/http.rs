//! A minimal HTTP/1.1 client over raw sockets (keep-alive, chunked bodies) and the signed webhooks it sends.

use super::*;

pub(crate) struct Head {
    pub(crate) len: usize,
    pub(crate) status: u16,
    pub(crate) content_length: Option<usize>,
    pub(crate) chunked: bool,
}

pub(crate) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

pub(crate) fn parse_head(buf: &[u8]) -> Option<Result<Head, String>> {
    let end = find(buf, b"\r\n\r\n")?;
    let text = String::from_utf8_lossy(&buf[..end]);
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok());
    let Some(status) = status else {
        return Some(Err(format!("bad status line: {text}")));
    };
    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            let k = k.trim().to_ascii_lowercase();
            if k == "content-length" {
                content_length = v.trim().parse().ok();
            } else if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            }
        }
    }
    Some(Ok(Head {
        len: end + 4,
        status,
        content_length,
        chunked,
    }))
}

pub(crate) fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = find(data, b"\r\n")?;
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        if data.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// One request on a fresh connection (`Connection: close`).
pub(crate) fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<(u16, Vec<u8>), String> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(120))).ok();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    s.write_all(body).map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(|e| e.to_string())?;
    let head = parse_head(&buf).ok_or("no HTTP answer")??;
    let rest = &buf[head.len..];
    let body = if head.chunked {
        dechunk(rest).ok_or("bad chunked body")?
    } else {
        rest.to_vec()
    };
    Ok((head.status, body))
}

/// A keep-alive connection for one request at a time (blocking).
pub(crate) struct KeepAlive {
    pub(crate) addr: SocketAddr,
    pub(crate) stream: Option<TcpStream>,
    pub(crate) buf: Vec<u8>,
}

impl KeepAlive {
    pub(crate) fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            stream: None,
            buf: Vec::with_capacity(4096),
        }
    }

    /// Sends one request; a reused connection the server has closed
    /// meanwhile (keep-alive timeout) is replaced once.
    pub(crate) fn request(&mut self, raw: &[u8]) -> Result<u16, String> {
        let reused = self.stream.is_some();
        match self.request_once(raw) {
            Err(e) if reused => {
                log(format!("keep-alive connection lost ({e}); reconnecting"));
                self.request_once(raw)
            }
            other => other,
        }
    }

    pub(crate) fn request_once(&mut self, raw: &[u8]) -> Result<u16, String> {
        if self.stream.is_none() {
            let s = TcpStream::connect(self.addr).map_err(|e| e.to_string())?;
            s.set_nodelay(true).ok();
            s.set_read_timeout(Some(Duration::from_secs(10))).ok();
            self.stream = Some(s);
        }
        let s = self.stream.as_mut().unwrap();
        let result = (|| {
            s.write_all(raw).map_err(|e| e.to_string())?;
            self.buf.clear();
            let mut chunk = [0u8; 4096];
            loop {
                if let Some(head) = parse_head(&self.buf) {
                    let head = head?;
                    let need = head.len + head.content_length.ok_or("no content-length")?;
                    if self.buf.len() >= need {
                        return Ok(head.status);
                    }
                }
                let n = s.read(&mut chunk).map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err("connection closed".to_string());
                }
                self.buf.extend_from_slice(&chunk[..n]);
            }
        })();
        if result.is_err() {
            self.stream = None;
        }
        result
    }
}

pub(crate) fn fake_counts(market: SocketAddr) -> Result<(u64, u64), String> {
    let (status, body) = http(market, "GET", "/_fake/stats", &[], b"")?;
    if status != 200 {
        return Err(format!("fake Market /_fake/stats answered {status}"));
    }
    let v: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    let requests = v["requests"].as_u64().unwrap_or(0);
    let ok = v["by_status"]["200"].as_u64().unwrap_or(0);
    Ok((requests, ok))
}

// ───────────────────────── webhooks ─────────────────────────

pub(crate) struct Webhooks {
    pub(crate) sample: serde_json::Map<String, Value>,
    pub(crate) host: String,
    pub(crate) tag: String,
    /// Added to the index to make order ids unique across phases.
    pub(crate) order_base: u64,
}

impl Webhooks {
    pub(crate) fn new(sample: &Value, host: SocketAddr, tag: &str, order_base: u64) -> Self {
        Self {
            sample: sample
                .as_object()
                .cloned()
                .expect("the sample event is an object"),
            host: host.to_string(),
            tag: tag.to_owned(),
            order_base,
        }
    }

    /// Event `i`: business `i mod 50`, one of 1000 chats per business,
    /// a unique order id (so every message text is unique).
    pub(crate) fn request(&self, i: u64) -> Vec<u8> {
        let business = FIRST_BUSINESS + (i as i64 % BUSINESSES);
        let chat = 100_000 + (i as i64 / BUSINESSES) % CHATS_PER_BUSINESS;
        let order = self.order_base + i;
        let id = format!("{}-{i}", self.tag);
        let mut event = self.sample.clone();
        event.insert("id".into(), Value::from(id.clone()));
        event.insert("businessId".into(), Value::from(business));
        event.insert("chatId".into(), Value::from(chat));
        event.insert("orderId".into(), Value::from(order));
        let body = serde_json::to_vec(&event).expect("JSON");
        let ts = now_ms() / 1000;
        let signature = chatbridge::ingest::signature::sign(SECRET, &id, ts, &body)
            .expect("the secret is valid");
        let mut req = format!(
            "POST /hooks/oms HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             webhook-id: {id}\r\nwebhook-timestamp: {ts}\r\nwebhook-signature: {signature}\r\n\r\n",
            self.host,
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(&body);
        req
    }
}
