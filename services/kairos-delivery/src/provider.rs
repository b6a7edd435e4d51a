//! Real providers: SMTP for e-mail, JSON over HTTP for SMS gateways, push services,
//! messenger bots and webhooks. Each classifies failures as transient (worth a retry)
//! or permanent (not), so the worker never retries what cannot succeed.

use std::time::{Duration, Instant};

use kairos_core::config::{HttpProviderConfig, SmtpConfig, SmtpSecurity};
use kairos_core::contracts::SendCommand;
use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, TlsParameters};
use lettre::transport::smtp::commands::{Data, Mail, Rcpt};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use lettre::Message;

use crate::templates::RenderedMessage;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProviderError {
    /// Worth retrying: a 4xx SMTP reply, HTTP 408/429/5xx, a refused connection.
    #[error("transient: {0}")]
    Transient(String),
    /// A 4xx to RCPT TO that puts off this one recipient (greylisting, a full mailbox,
    /// an address the server is still verifying; not a 421 or a `4.3.x`/`4.4.x` code,
    /// the server's own trouble: see `puts_off_the_recipient`). The worker sets the
    /// send aside and tries again in minutes; no sign of an outage: it must not open
    /// the breaker for every other customer's message.
    #[error("recipient deferred: {0}")]
    RecipientDeferred(String),
    /// The provider asked to be left alone for a while (HTTP 429 or 503 with a
    /// `Retry-After`): worth retrying, not before that wait.
    #[error("throttled: {0} (asked to wait {1:?})")]
    Throttled(String, Duration),
    /// No answer came (a timeout, a dropped connection): worth retrying, unless the
    /// whole message had already been handed over.
    #[error("no answer: {0}")]
    NoAnswer(String),
    /// The recipient address does not exist or cannot be one (SMTP 5xx to RCPT TO,
    /// HTTP 410, an address that does not parse): a hard bounce.
    #[error("hard bounce: {0}")]
    HardBounce(String),
    /// Will never succeed as is: a rejected request, no address at all.
    #[error("permanent: {0}")]
    Permanent(String),
    /// The provider refuses the worker, not this message: its credentials (SMTP
    /// 530/535, HTTP 401/403), its sender (a 5xx to MAIL FROM) or its route (HTTP 404).
    /// No send can succeed until the configuration is fixed, and none of them is at
    /// fault: each is retried against the breaker and then dead-lettered with its
    /// payload, never failed for good nor its address marked dead.
    #[error("provider refused: {0}")]
    Refused(String),
    /// The gateway holds a request with this idempotency key still in progress (HTTP
    /// 409: an earlier attempt whose answer was lost). Asked again, it answers with
    /// that request's result; still in progress at the last attempt, the message is
    /// in doubt, not failed: the gateway has it.
    #[error("in progress: {0}")]
    InProgress(String),
}

pub enum Provider {
    Smtp(Box<SmtpProvider>),
    Http(HttpProvider),
}

impl Provider {
    pub fn name(&self) -> &'static str {
        match self {
            Provider::Smtp(_) => "smtp",
            Provider::Http(_) => "http",
        }
    }

    /// The message as this provider sends it, built once for every attempt; an error
    /// stops the message before the provider is asked (an e-mail address that does
    /// not parse, a message that cannot be built): no answer of the provider's, so it
    /// says nothing of the provider's health.
    pub fn prepare(
        &self,
        cmd: &SendCommand,
        message: &RenderedMessage,
    ) -> Result<Prepared, ProviderError> {
        match self {
            Provider::Smtp(p) => p.build(cmd, message).map(|m| Prepared(Some(m))),
            Provider::Http(_) => Ok(Prepared(None)),
        }
    }

    /// Sends one message. `commit_point` runs at the last moment the send can still
    /// be abandoned without the provider keeping it (SMTP: before the final ".").
    pub async fn send(
        &self,
        cmd: &SendCommand,
        message: &RenderedMessage,
        prepared: &Prepared,
        commit_point: &dyn Fn(),
    ) -> Result<(), ProviderError> {
        match (self, &prepared.0) {
            (Provider::Smtp(p), Some(built)) => p.send_built(built, commit_point).await,
            (Provider::Smtp(p), None) => p.send(cmd, message, commit_point).await,
            (Provider::Http(p), _) => p.send(cmd, message).await,
        }
    }
}

/// A message as [`Provider::prepare`] built it (the e-mail for SMTP; nothing for HTTP,
/// whose request is the command itself).
pub struct Prepared(Option<Message>);

/// An SMTP client on one kept-alive connection, driven step by step so the worker
/// learns the commit point of the conversation: SMTP servers keep a message only once
/// its final "." arrives, so the worker records "about to commit" right before it.
pub struct SmtpProvider {
    config: SmtpConfig,
    from: Mailbox,
    reply_to: Option<Mailbox>,
    /// The kept-alive connection and when it last served a message.
    connection: tokio::sync::Mutex<Option<(AsyncSmtpConnection, Instant)>>,
    /// A connection idle this long is asked (NOOP) whether it still stands before it
    /// is used again: servers close idle sessions (Postfix after 300 s), and sending on
    /// a closed one fails the message's attempt.
    idle_check: Duration,
}

/// See [`SmtpProvider::idle_check`].
const SMTP_IDLE_CHECK: Duration = Duration::from_secs(10);

/// How long a refused conversation's QUIT may take: a server that never answers it
/// must not hold the worker (lettre reads the reply without a timeout of its own).
const SMTP_QUIT_WAIT: Duration = Duration::from_secs(2);

impl SmtpProvider {
    pub fn new(c: &SmtpConfig) -> anyhow::Result<Self> {
        let parse = |what: &str, v: &str| -> anyhow::Result<Mailbox> {
            v.parse()
                .map_err(|e| anyhow::anyhow!("smtp.{what} {v:?} is not a mailbox: {e}"))
        };
        Ok(SmtpProvider {
            config: c.clone(),
            from: parse("from", &c.from)?,
            reply_to: c
                .reply_to
                .as_deref()
                .map(|r| parse("reply_to", r))
                .transpose()?,
            connection: tokio::sync::Mutex::new(None),
            idle_check: SMTP_IDLE_CHECK,
        })
    }

    fn build(&self, cmd: &SendCommand, m: &RenderedMessage) -> Result<Message, ProviderError> {
        let to: Mailbox = cmd
            .address
            .as_deref()
            .ok_or_else(|| ProviderError::Permanent("invalid_address: no e-mail address".into()))?
            .parse()
            // An address that cannot be one is as dead as one that bounced.
            .map_err(|e| ProviderError::HardBounce(format!("invalid_address: {e}")))?;
        let to = with_ascii_domain(to)?;
        let mut b = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(m.subject.clone().unwrap_or_default())
            // The send id names the message, so any duplicate is recognisable downstream.
            .message_id(Some(format!("<{}@kairos>", cmd.send_id)))
            .raw_header(HeaderValue::new(
                HeaderName::new_from_ascii_str("X-Kairos-Send-Id"),
                cmd.send_id.clone(),
            ));
        // What a provider webhook event must carry back besides the send id (see
        // `webhook`): relays that echo a message's headers into their events (SES,
        // Mailgun, Postmark) let the glue code fill them in.
        for (name, value) in [
            ("X-Kairos-Customer-Id", cmd.customer_id.as_str()),
            ("X-Kairos-Scenario", cmd.scenario.as_str()),
            ("X-Kairos-Category", cmd.category.as_str()),
        ] {
            b = b.raw_header(HeaderValue::new(
                HeaderName::new_from_ascii_str(name),
                value.to_string(),
            ));
        }
        if let Some(r) = &self.reply_to {
            b = b.reply_to(r.clone());
        }
        if let Some(url) = &m.unsubscribe_url {
            // One-click (RFC 8058) is a POST to an https URL; a mailto: or plain http
            // one is a link only.
            let one_click = url.starts_with("https://");
            b = b.raw_header(HeaderValue::new(
                HeaderName::new_from_ascii_str("List-Unsubscribe"),
                format!("<{url}>"),
            ));
            if one_click {
                b = b.raw_header(HeaderValue::new(
                    HeaderName::new_from_ascii_str("List-Unsubscribe-Post"),
                    "List-Unsubscribe=One-Click".into(),
                ));
            }
        }
        if let Some(p) = &m.preheader {
            b = b.raw_header(HeaderValue::new(
                HeaderName::new_from_ascii_str("X-Preheader"),
                p.clone(),
            ));
        }
        // A MIME part, not a bare body: without `MIME-Version` and a charset, clients
        // read a quoted-printable "Анна" as us-ascii and show "=D0=90...".
        b.singlepart(lettre::message::SinglePart::plain(m.body.clone()))
            .map_err(|e| ProviderError::Permanent(format!("message: {e}")))
    }

    async fn connect(&self) -> Result<AsyncSmtpConnection, lettre::transport::smtp::Error> {
        let c = &self.config;
        let hello = ClientId::default();
        let tls = || TlsParameters::new(c.host.clone());
        let mut conn = AsyncSmtpConnection::connect_tokio1(
            (c.host.as_str(), c.port),
            Some(c.timeout),
            &hello,
            match c.security {
                SmtpSecurity::Tls => Some(tls()?),
                _ => None,
            },
            None,
        )
        .await?;
        if c.security == SmtpSecurity::Starttls {
            conn.starttls(tls()?, &hello).await?;
        }
        if let (Some(user), Some(password)) = (&c.username, &c.password) {
            let credentials = Credentials::new(user.clone(), password.clone());
            conn.auth(&[Mechanism::Plain, Mechanism::Login], &credentials)
                .await?;
        }
        Ok(conn)
    }

    async fn send(
        &self,
        cmd: &SendCommand,
        m: &RenderedMessage,
        commit_point: &dyn Fn(),
    ) -> Result<(), ProviderError> {
        let message = self.build(cmd, m)?;
        self.send_built(&message, commit_point).await
    }

    /// Sends a message built by [`SmtpProvider::build`].
    async fn send_built(
        &self,
        message: &Message,
        commit_point: &dyn Fn(),
    ) -> Result<(), ProviderError> {
        let envelope = message.envelope().clone();
        let bytes = message.formatted();
        let utf8_address = envelope
            .to()
            .iter()
            .chain(envelope.from())
            .any(|a| !a.user().is_ascii() || !a.domain().is_ascii());
        let mut slot = self.connection.lock().await;
        let kept = match slot.take() {
            Some((conn, _)) if conn.has_broken() => None,
            Some((conn, used)) if used.elapsed() < self.idle_check => Some(conn),
            Some((mut conn, _)) => {
                let asked = tokio::time::timeout(self.config.timeout, conn.test_connected());
                match asked.await {
                    Ok(true) => Some(conn),
                    _ => {
                        quit(conn).await;
                        None
                    }
                }
            }
            None => None,
        };
        let mut conn = match kept {
            Some(conn) => conn,
            None => match tokio::time::timeout(self.config.timeout, self.connect()).await {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => return Err(classify(e, SmtpStep::Connect)),
                Err(_) => return Err(ProviderError::Transient("connect timed out".into())),
            },
        };
        // RFC 6531: a non-ASCII local part goes only to a server that offers SMTPUTF8
        // (the domain was made ASCII already); elsewhere the message fails, and the
        // address is not marked dead for it.
        let mut mail_options = Vec::new();
        if utf8_address {
            if !conn.server_info().supports_feature(Extension::SmtpUtfEight) {
                *slot = Some((conn, Instant::now()));
                return Err(ProviderError::Permanent(
                    "smtputf8_unsupported: the address has a non-ASCII local part and the server does not offer SMTPUTF8".into(),
                ));
            }
            mail_options.push(MailParameter::SmtpUtfEight);
        }
        if !bytes.is_ascii() && conn.server_info().supports_feature(Extension::EightBitMime) {
            mail_options.push(MailParameter::Body(MailBodyParameter::EightBitMime));
        }
        // Which command an error answers says whose fault it is (see `classify`).
        let step = std::cell::Cell::new(SmtpStep::MailFrom);
        let conversation = async {
            conn.command(Mail::new(envelope.from().cloned(), mail_options))
                .await?;
            step.set(SmtpStep::RcptTo);
            for to in envelope.to() {
                conn.command(Rcpt::new(to.clone(), vec![])).await?;
            }
            step.set(SmtpStep::Data);
            conn.command(Data).await?;
            step.set(SmtpStep::Message);
            // The message goes out in one part; when the iterator runs dry the client
            // writes the final "." next: the commit point.
            let mut parts = std::iter::once(bytes.as_slice());
            let mut committed = false;
            let with_commit = std::iter::from_fn(|| match parts.next() {
                Some(p) => Some(p),
                None => {
                    if !committed {
                        committed = true;
                        commit_point();
                    }
                    None
                }
            });
            conn.message_iter(with_commit).await
        };
        match tokio::time::timeout(self.config.timeout, conversation).await {
            Ok(Ok(_)) => {
                *slot = Some((conn, Instant::now()));
                Ok(())
            }
            // A refused step leaves the session in the middle of a transaction:
            // start the next send on a fresh connection.
            Ok(Err(e)) => {
                quit(conn).await;
                Err(classify(e, step.get()))
            }
            Err(_) => Err(ProviderError::NoAnswer(format!(
                "no answer within {:?}",
                self.config.timeout
            ))),
        }
    }
}

/// Ends a session politely if the server answers within [`SMTP_QUIT_WAIT`], and drops
/// it either way.
async fn quit(mut conn: AsyncSmtpConnection) {
    let _ = tokio::time::timeout(SMTP_QUIT_WAIT, conn.abort()).await;
}

/// `mailbox` with its domain in ASCII (IDNA: `bücher.de` is `xn--bcher-kva.de`), which
/// every server takes; only a non-ASCII local part needs the server's SMTPUTF8.
fn with_ascii_domain(mailbox: Mailbox) -> Result<Mailbox, ProviderError> {
    let domain = mailbox.email.domain();
    if domain.is_ascii() {
        return Ok(mailbox);
    }
    let dead = |e: String| ProviderError::HardBounce(format!("invalid_address: {e}"));
    let ascii = kairos_core::identifiers::ascii_domain(domain)
        .map_err(|e| dead(format!("{domain}: {e}")))?;
    let email =
        lettre::Address::new(mailbox.email.user(), ascii).map_err(|e| dead(e.to_string()))?;
    Ok(Mailbox::new(mailbox.name, email))
}

/// The enhanced status code (RFC 3463, `4.7.1`) in a server's reply, if it gives one.
fn enhanced_status(reply: &str) -> Option<&str> {
    reply
        .split(|c: char| c.is_whitespace() || matches!(c, ':' | ',' | '(' | ')'))
        .find(|token| {
            let parts: Vec<&str> = token.split('.').collect();
            parts.len() == 3
                && matches!(parts[0], "4" | "5")
                && parts[1..]
                    .iter()
                    .all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
        })
}

/// Whether a 4xx to `RCPT TO` puts off this recipient (greylisting, `4.7.x`; a full
/// mailbox, `4.2.2`), to be tried again in minutes, rather than tell of the server's
/// own trouble (421 closing, `4.3.x` system, `4.4.x` network), which a relay often
/// answers at any step and which is retried at once and counts against the breaker.
fn puts_off_the_recipient(code: &str, reply: &str) -> bool {
    let server_trouble = code == "421"
        || enhanced_status(reply).is_some_and(|s| s.starts_with("4.3.") || s.starts_with("4.4."));
    !server_trouble
}

/// The step of an SMTP conversation an answer belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SmtpStep {
    /// Greeting, EHLO, STARTTLS and login.
    Connect,
    MailFrom,
    RcptTo,
    /// The DATA command, before any of the message.
    Data,
    /// The message and its final ".".
    Message,
}

fn classify(e: lettre::transport::smtp::Error, step: SmtpStep) -> ProviderError {
    let code = e.status().map(|c| c.to_string()).unwrap_or_default();
    let reply = e.to_string();
    if e.is_permanent() {
        match step {
            // A refused login or sender refuses every message alike: marking each
            // recipient dead would suppress the whole base for a configuration error.
            SmtpStep::Connect | SmtpStep::MailFrom => ProviderError::Refused(reply),
            // 550/551/553 to RCPT TO: the mailbox is unavailable or unknown: dead,
            // unless the enhanced status says otherwise.
            SmtpStep::RcptTo => match rcpt_refusal(&code, &reply) {
                RcptRefusal::DeadMailbox => ProviderError::HardBounce(reply),
                RcptRefusal::Worker => ProviderError::Refused(reply),
                RcptRefusal::Message => ProviderError::Permanent(reply),
            },
            // A relay or sender-authentication refusal to the message refuses every
            // one alike (SES's unverified sender, Gmail's 5.7.26).
            _ if refuses_the_worker(&reply) => ProviderError::Refused(reply),
            // Any other 5xx, and any 5xx to the message itself (a 550 "refused as
            // spam" says nothing of the mailbox): this message fails.
            _ => ProviderError::Permanent(reply),
        }
    } else if e.is_transient() && step == SmtpStep::RcptTo && puts_off_the_recipient(&code, &reply)
    {
        ProviderError::RecipientDeferred(reply)
    } else if e.is_transient() {
        // A 4xx reply: the server answered and refused for now.
        ProviderError::Transient(reply)
    } else if step == SmtpStep::Connect && (e.is_tls() || e.is_client() || failed_in_tls(&e)) {
        // The session could not be set up as configured (the relay's certificate not
        // trusted, no STARTTLS, no login mechanism in common): every send would fail
        // alike until the configuration or the relay changes.
        ProviderError::Refused(with_causes(&e))
    } else {
        ProviderError::NoAnswer(reply)
    }
}

/// Whether a TLS handshake failed under `e` (a plain relay spoken to in TLS, its
/// certificate not trusted), as opposed to a connection refused or cut.
fn failed_in_tls(e: &dyn std::error::Error) -> bool {
    let mut cause = e.source();
    while let Some(c) = cause {
        if c.is::<native_tls::Error>() {
            return true;
        }
        cause = c.source();
    }
    false
}

/// What a permanent refusal of RCPT TO says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RcptRefusal {
    /// The mailbox does not exist or cannot: a hard bounce.
    DeadMailbox,
    /// The sender or the worker is refused (a bad sender address, `5.1.7`/`5.1.8`, a
    /// relay that does not relay for it): every message would be, so it refuses the
    /// worker and marks no recipient dead.
    Worker,
    /// This message fails (a policy refusal such as `5.7.1`, a full mailbox `5.2.2`).
    Message,
}

/// Reads a permanent refusal of RCPT TO (reply `code`, whole `reply` text). The
/// enhanced status code (RFC 3463), when the server gives one, decides: the `5.1.x`
/// codes of a bad destination address are a dead mailbox, and so is Microsoft's `5.4.1`
/// "Recipient address rejected" (its directory says the mailbox does not exist);
/// `5.1.7` and `5.1.8` name the sender, as does any "Sender address rejected" text.
/// Without a code, 550, 551 and 553 are a dead mailbox.
fn rcpt_refusal(code: &str, reply: &str) -> RcptRefusal {
    let enhanced = enhanced_status(reply);
    // Postfix checks the sender at RCPT TO too, and says so in the text (with codes
    // such as 5.1.0 or 5.7.1), and so does a relay that takes no mail from this
    // worker: marking the recipient dead, or failing it for good, would do so to the
    // whole base.
    if refuses_the_worker(reply) {
        return RcptRefusal::Worker;
    }
    let text = reply.to_ascii_lowercase();
    match enhanced {
        Some("5.1.0" | "5.1.1" | "5.1.2" | "5.1.3" | "5.1.6" | "5.1.10") => {
            RcptRefusal::DeadMailbox
        }
        Some("5.4.1") if text.contains("recipient address rejected") => RcptRefusal::DeadMailbox,
        Some("5.1.7" | "5.1.8") => RcptRefusal::Worker,
        Some(_) => RcptRefusal::Message,
        None if matches!(code, "550" | "551" | "553") => RcptRefusal::DeadMailbox,
        None => RcptRefusal::Message,
    }
}

/// Whether a permanent refusal names the worker rather than the message or the
/// recipient: the sender refused, the relay not relaying for it (no login, an address
/// outside its networks), or the sender's domain not authenticated. Every message
/// would be refused alike, so the worker stops and dead-letters rather than failing
/// the backlog for good. The codes (`5.7.0`, `5.7.1`) are shared with message
/// policies, so the text decides.
fn refuses_the_worker(reply: &str) -> bool {
    const WORKER_REFUSALS: [&str; 10] = [
        "sender address rejected",
        "relay access denied",
        "relaying denied",
        "relay denied",
        "unable to relay",
        "relay not permitted",
        "authentication required",
        "email address is not verified",
        "5.7.26",
        "5.7.54",
    ];
    let text = reply.to_ascii_lowercase();
    WORKER_REFUSALS.iter().any(|refusal| text.contains(refusal))
}

pub struct HttpProvider {
    client: reqwest::Client,
    config: HttpProviderConfig,
}

impl HttpProvider {
    pub fn new(config: &HttpProviderConfig) -> anyhow::Result<Self> {
        let mut builder = reqwest::Client::builder();
        if let Some(file) = &config.ca_file {
            let certificates = kairos_core::config::read_certificates(file)
                .map_err(|e| anyhow::anyhow!("http.ca_file: {e}"))?;
            for certificate in certificates {
                builder = builder.add_root_certificate(certificate);
            }
        }
        let client = builder
            .timeout(config.timeout)
            // Below the whole request's timeout, so a connect that hangs (a host that
            // drops packets) fails as a connect error, which means "not sent": at the
            // same length the request's timeout fires first and reads as "no answer",
            // as if the gateway might hold the message.
            .connect_timeout((config.timeout / 2).min(Duration::from_secs(5)))
            // A redirect followed would turn the POST into a GET, and its 200 would
            // count a message nobody received as sent.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(HttpProvider {
            client,
            config: config.clone(),
        })
    }

    async fn send(&self, cmd: &SendCommand, m: &RenderedMessage) -> Result<(), ProviderError> {
        let mut body = serde_json::json!({
            "send_id": cmd.send_id,
            "channel": cmd.channel,
            "to": cmd.address,
            "customer_id": cmd.customer_id,
            "scenario": cmd.scenario,
            "category": cmd.category,
            "title": m.subject,
            "preheader": m.preheader,
            "text": m.body,
            "valid_until": cmd.valid_until,
        });
        // Only when configured: a gateway with a strict schema need not know the key.
        if let Some(url) = &m.unsubscribe_url {
            body["unsubscribe_url"] = url.as_str().into();
        }
        let mut request = self
            .client
            .post(&self.config.url)
            .header(
                self.config.idempotency_header.as_str(),
                cmd.send_id.as_str(),
            )
            .json(&body);
        if let (Some(h), Some(v)) = (&self.config.auth_header, &self.config.auth_value) {
            request = request.header(h.as_str(), v.as_str());
        }
        let response = request.send().await.map_err(|e| {
            // Without the URL: a gateway's key in its query string would otherwise go
            // into the outcome's reason, the dead letter and the log.
            let e = e.without_url();
            let cause = with_causes(&e);
            if e.is_builder() {
                // The request could not be made (a header the configuration gives is
                // no valid header): nothing went out, and no send can.
                ProviderError::Refused(format!("request not made: {cause}"))
            } else if e.is_connect() {
                // Never reached the gateway: refused, unreachable, or its certificate
                // not trusted.
                ProviderError::Transient(format!("request failed: {cause}"))
            } else if e.is_timeout() {
                // Timed out after connecting: the request may have reached the gateway.
                ProviderError::NoAnswer(format!("no answer in time: {cause}"))
            } else {
                // Cut off once the request was on its way (a reset, a closed
                // connection): the gateway may hold it. (A pooled connection the
                // gateway had closed before the request went is retried by the client.)
                ProviderError::NoAnswer(format!("connection lost before the answer: {cause}"))
            }
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| retry_after(v, std::time::SystemTime::now()));
        let text = body_start(response, ERROR_BODY_READ).await;
        let detail = format!(
            "HTTP {status}: {}",
            text.chars().take(200).collect::<String>()
        );
        Err(http_error(status.as_u16(), detail, retry_after))
    }
}

/// Bytes of an error answer's body read at most: enough for what went wrong.
const ERROR_BODY_READ: usize = 1024;

/// The first `limit` bytes of `response`'s body, as text: a gateway or proxy that
/// answers an error with a large (or endless) page is not read into memory whole.
async fn body_start(mut response: reqwest::Response, limit: usize) -> String {
    let mut bytes = Vec::new();
    while bytes.len() < limit {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = limit - bytes.len();
                bytes.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            _ => break,
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// An error with its causes, which hold what went wrong ("certificate verify failed"
/// under "error sending request").
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

/// The wait a `Retry-After` header asks for: seconds, or an HTTP date (none for a
/// date already past or a value that is neither).
fn retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    httpdate::parse_http_date(value)
        .ok()
        .and_then(|at| at.duration_since(now).ok())
}

/// What a non-success HTTP status from the gateway means for the send, with the wait
/// its `Retry-After` header asked for.
fn http_error(status: u16, detail: String, retry_after: Option<Duration>) -> ProviderError {
    match (status, retry_after) {
        (429 | 503, Some(wait)) => ProviderError::Throttled(detail, wait),
        _ => http_status_error(status, detail),
    }
}

/// What a non-success HTTP status from the gateway means for the send.
fn http_status_error(status: u16, detail: String) -> ProviderError {
    match status {
        // 409: a request with this idempotency key is still in progress (an earlier
        // attempt whose answer was lost); asked again later, the gateway answers with
        // that request's result.
        409 => ProviderError::InProgress(detail),
        // A proxy in front of the gateway answered for it (bad gateway, gateway
        // timeout): the gateway may have taken the request all the same.
        502 | 504 => ProviderError::NoAnswer(detail),
        408 | 429 | 500..=599 => ProviderError::Transient(detail),
        // The recipient (token, number, chat) is gone for good: the address is dead,
        // as for an SMTP 5xx to RCPT TO.
        410 => ProviderError::HardBounce(detail),
        // Credentials refused, or no such route: every send goes to one URL, so a 404
        // is far more likely a missing route (a misconfiguration, a gateway deploy)
        // than an unknown recipient. Every send would fail alike.
        // A redirect (not followed) says the URL is not the gateway's.
        300..=399 | 401 | 403 | 404 | 407 => ProviderError::Refused(detail),
        _ => ProviderError::Permanent(detail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_smtp::scripted_smtp;

    /// The message's opt-out link in `List-Unsubscribe`, one-click over https; none
    /// without one.
    #[test]
    fn an_email_is_utf8_text_and_offers_one_click_unsubscribe_over_https_only() {
        let (cmd, mut message) = email_to("anna@example.com");
        message.body = "Здравствуйте, Анна! Ваша корзина ждёт.".into();
        let provider = smtp_provider(25);
        let built = provider.build(&cmd, &message).expect("built");
        let text = String::from_utf8(built.formatted()).expect("ascii on the wire");
        assert!(!text.contains("List-Unsubscribe"), "{text}");
        for (url, one_click) in [
            ("https://shop.example/u?c=c1", true),
            ("mailto:unsubscribe@shop.example?subject=c1", false),
        ] {
            message.unsubscribe_url = Some(url.into());
            let built = provider.build(&cmd, &message).expect("built");
            let text = String::from_utf8(built.formatted()).expect("ascii on the wire");
            assert!(text.contains("MIME-Version: 1.0"), "{text}");
            assert!(
                text.contains("Content-Type: text/plain; charset=utf-8"),
                "{text}"
            );
            assert!(
                text.contains(&format!("List-Unsubscribe: <{url}>")),
                "{text}"
            );
            // What a provider's webhook event must carry back.
            for header in [
                "X-Kairos-Send-Id: s1",
                "X-Kairos-Customer-Id: c1",
                "X-Kairos-Scenario: welcome",
                "X-Kairos-Category: trigger",
            ] {
                assert!(text.contains(header), "{header}: {text}");
            }
            assert_eq!(text.contains("List-Unsubscribe-Post"), one_click, "{text}");
        }
    }

    /// What the gateway at `url` makes of an SMS.
    async fn sms_to_gateway(url: &str) -> Result<(), ProviderError> {
        let provider = HttpProvider::new(&HttpProviderConfig {
            url: url.into(),
            auth_header: None,
            auth_value: None,
            idempotency_header: "Idempotency-Key".into(),
            timeout: Duration::from_secs(5),
            list_unsubscribe: None,
            ca_file: None,
        })
        .unwrap();
        let cmd: SendCommand = serde_json::from_value(serde_json::json!({
            "send_id": "s1", "trigger_id": "t1", "customer_id": "c1",
            "scenario": "abandoned_cart", "channel": "sms", "category": "trigger",
            "template": "abandoned_cart", "address": "+491701234567", "variables": "{}",
            "created_at": 0, "valid_until": 1, "cause_occurred_at": 0, "reasons": []
        }))
        .unwrap();
        let message = RenderedMessage {
            subject: None,
            preheader: None,
            body: "hi".into(),
            unsubscribe_url: None,
        };
        provider.send(&cmd, &message).await
    }

    /// A gateway URL that redirects is refused, not followed: the POST would become a
    /// GET, and the target's 200 would report a message sent that nobody received.
    #[tokio::test]
    async fn a_redirect_from_the_gateway_is_not_followed() {
        let app = axum::Router::new()
            .route(
                "/sms",
                axum::routing::post(|| async { axum::response::Redirect::to("/elsewhere") }),
            )
            .route("/elsewhere", axum::routing::any(|| async { "ok" }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let result = sms_to_gateway(&format!("http://{addr}/sms")).await;
        assert!(
            matches!(&result, Err(ProviderError::Refused(e)) if e.contains("303")),
            "{result:?}"
        );
    }

    /// A gateway's key in its URL's query string stays out of the error a failed call
    /// reports (it becomes the outcome's reason and the dead letter's).
    #[tokio::test]
    async fn a_failed_call_does_not_tell_the_gateway_s_key() {
        // A port nobody listens on: the connection is refused.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let result = sms_to_gateway(&format!("http://{addr}/sms?apiKey=s3cr3t-key")).await;
        let Err(ProviderError::Transient(reason)) = &result else {
            panic!("a refused connection is transient: {result:?}");
        };
        assert!(!reason.contains("s3cr3t-key"), "{reason}");
    }

    #[test]
    fn only_a_bad_address_refused_at_rcpt_is_a_hard_bounce() {
        use RcptRefusal::*;
        let cases = [
            (
                "550",
                "550 5.1.1 <x@example.com>: user unknown",
                DeadMailbox,
            ),
            ("554", "554 5.1.1 no such mailbox", DeadMailbox),
            (
                "550",
                "550 5.4.1 Recipient address rejected: Access denied",
                DeadMailbox,
            ),
            (
                "550",
                "550 5.7.1 client host blocked using zen.spamhaus.org",
                Message,
            ),
            ("552", "552 5.2.2 mailbox full", Message),
            (
                "550",
                "550 5.1.8 Access denied, bad outbound sender",
                Worker,
            ),
            ("553", "553 5.1.7 sender address invalid", Worker),
            (
                "550",
                "550 5.1.0 <noreply@brand.example>: Sender address rejected: User unknown",
                Worker,
            ),
            (
                "553",
                "553 5.7.1 <a@b.example>: Sender address rejected: not owned by user",
                Worker,
            ),
            (
                "554",
                "554 5.7.1 <x@gmail.com>: Relay access denied",
                Worker,
            ),
            (
                "550",
                "550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain",
                Worker,
            ),
            ("530", "530 5.7.0 Authentication required", Worker),
            ("550", "550 no such user here", DeadMailbox),
            ("553", "553 mailbox name not allowed", DeadMailbox),
            ("554", "554 transaction failed", Message),
        ];
        for (code, reply, expected) in cases {
            assert_eq!(rcpt_refusal(code, reply), expected, "{reply}");
        }
    }

    /// A 4xx to RCPT TO puts off the recipient, not the server.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_temporary_refusal_of_the_recipient_is_a_deferral() {
        let (port, kept) =
            scripted_smtp("450 4.2.0 greylisted, try again later", false, true).await;
        let provider = smtp_provider(port);
        let (cmd, message) = email_to("anna@example.com");
        let result = provider.send(&cmd, &message, &|| {}).await;
        assert!(
            matches!(&result, Err(ProviderError::RecipientDeferred(e)) if e.contains("greylisted")),
            "{result:?}"
        );
        assert_eq!(kept.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    /// A 4xx to RCPT TO that tells of the server's own trouble is no deferral of the
    /// recipient: retried at once, counted against the breaker.
    #[test]
    fn a_server_in_trouble_at_rcpt_is_no_recipient_deferral() {
        let cases = [
            ("450", "450 4.2.0 greylisted, try again later", true),
            ("451", "451 4.7.1 Please try again later", true),
            ("452", "452 4.2.2 Mailbox full", true),
            ("450", "450 Requested mail action not taken", true),
            (
                "421",
                "421 4.7.0 Try again later, closing connection",
                false,
            ),
            ("451", "451 4.3.0 Local error in processing", false),
            ("452", "452 4.3.1 Insufficient system storage", false),
            ("451", "451 4.4.3 Directory server failure", false),
        ];
        for (code, reply, deferral) in cases {
            assert_eq!(puts_off_the_recipient(code, reply), deferral, "{reply}");
        }
    }

    fn smtp_provider(port: u16) -> SmtpProvider {
        smtp_provider_with(port, SmtpSecurity::None, None)
    }

    /// [`smtp_provider`] with a transport security and a login (user and password).
    fn smtp_provider_with(
        port: u16,
        security: SmtpSecurity,
        login: Option<(&str, &str)>,
    ) -> SmtpProvider {
        SmtpProvider::new(&SmtpConfig {
            host: "127.0.0.1".into(),
            port,
            security,
            username: login.map(|(user, _)| user.to_string()),
            password: login.map(|(_, password)| password.to_string()),
            from: "Shop <news@shop.example>".into(),
            reply_to: None,
            list_unsubscribe: None,
            timeout: Duration::from_secs(5),
        })
        .unwrap()
    }

    fn email_to(address: &str) -> (SendCommand, RenderedMessage) {
        let cmd: SendCommand = serde_json::from_value(serde_json::json!({
            "send_id": "s1", "trigger_id": "t1", "customer_id": "c1",
            "scenario": "welcome", "channel": "email", "category": "trigger",
            "template": "welcome", "address": address, "variables": "{}",
            "created_at": 0, "valid_until": 1, "cause_occurred_at": 0, "reasons": []
        }))
        .unwrap();
        let message = RenderedMessage {
            subject: Some("Hello".into()),
            preheader: None,
            body: "hi".into(),
            unsubscribe_url: None,
        };
        (cmd, message)
    }

    /// A kept-alive session the server closed meanwhile is found out before the next
    /// message and replaced, instead of failing that message's attempt.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_kept_connection_the_server_closed_is_replaced_before_it_fails_a_message() {
        let (port, messages) = scripted_smtp("250 ok", true, true).await;
        let mut provider = smtp_provider(port);
        provider.idle_check = Duration::ZERO;
        let (cmd, message) = email_to("anna@example.com");
        for n in 1..=2 {
            let result = provider.send(&cmd, &message, &|| {}).await;
            assert!(result.is_ok(), "message {n}: {result:?}");
        }
        assert_eq!(messages.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    /// A header the configuration gives that is no valid header: the request is never
    /// made, so the send is not in doubt; the worker is refused.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_request_that_cannot_be_made_refuses_the_worker() {
        let provider = HttpProvider::new(&HttpProviderConfig {
            url: "http://127.0.0.1:9/sms".into(),
            auth_header: Some("X Api-Key".into()),
            auth_value: Some("secret".into()),
            idempotency_header: "Idempotency-Key".into(),
            timeout: Duration::from_secs(5),
            list_unsubscribe: None,
            ca_file: None,
        })
        .unwrap();
        let (cmd, message) = email_to("anna@example.com");
        let result = provider.send(&cmd, &message).await;
        assert!(
            matches!(&result, Err(ProviderError::Refused(e)) if e.contains("not made")),
            "{result:?}"
        );
    }

    /// A session that cannot be set up as configured refuses the worker (the alert on
    /// refusals fires), instead of reading as an outage: a relay without STARTTLS, a
    /// plain relay spoken to in TLS, a login with no mechanism in common.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_session_that_cannot_be_set_up_as_configured_refuses_the_worker() {
        let (port, messages) = scripted_smtp("250 ok", false, true).await;
        let (cmd, message) = email_to("anna@example.com");
        for (security, login) in [
            (SmtpSecurity::Starttls, None),
            (SmtpSecurity::Tls, None),
            (SmtpSecurity::None, Some(("shop", "secret"))),
        ] {
            let provider = smtp_provider_with(port, security, login);
            let result = provider.send(&cmd, &message, &|| {}).await;
            assert!(
                matches!(&result, Err(ProviderError::Refused(_))),
                "{security:?}, {login:?}: {result:?}"
            );
        }
        assert_eq!(messages.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    /// A server that refuses a recipient and then never answers QUIT does not hold the
    /// worker: the refusal is reported.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_server_that_never_answers_quit_does_not_hold_the_worker() {
        let (port, _) = scripted_smtp("550 5.7.1 Message rejected as spam", false, false).await;
        let provider = smtp_provider(port);
        let (cmd, message) = email_to("anna@example.com");
        let result = tokio::time::timeout(
            Duration::from_secs(30),
            provider.send(&cmd, &message, &|| {}),
        )
        .await
        .expect("the send ends");
        assert!(
            matches!(&result, Err(ProviderError::Permanent(e)) if e.contains("spam")),
            "{result:?}"
        );
    }

    #[test]
    fn relay_and_sender_authentication_refusals_refuse_the_worker_not_the_message() {
        for reply in [
            "554 Message rejected: Email address is not verified. The following identities failed the check: noreply@brand.example",
            "550 5.7.26 This mail has been blocked because the sender is unauthenticated.",
            "550 5.7.0 Mail relay denied",
            "553 5.7.1 <noreply@brand.example>: Sender address rejected: not owned by user",
        ] {
            assert!(refuses_the_worker(reply), "{reply}");
        }
        for reply in [
            "554 5.7.1 Message rejected by policy",
            "550 5.7.1 Message rejected as spam",
            "552 5.2.2 mailbox full",
        ] {
            assert!(!refuses_the_worker(reply), "{reply}");
        }
    }

    /// The gateway gets what its message needs shown (the preheader too, for a push
    /// or in-app preview) and what its events must carry back.
    #[tokio::test]
    async fn the_gateway_gets_the_preheader_and_what_its_events_carry_back() {
        let got = std::sync::Arc::new(std::sync::Mutex::new(None::<serde_json::Value>));
        let kept = got.clone();
        let app = axum::Router::new().route(
            "/push",
            axum::routing::post(move |axum::Json(body): axum::Json<serde_json::Value>| {
                let kept = kept.clone();
                async move {
                    *kept.lock().expect("body") = Some(body);
                    "ok"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let provider = HttpProvider::new(&HttpProviderConfig {
            url: format!("http://{addr}/push"),
            auth_header: None,
            auth_value: None,
            idempotency_header: "Idempotency-Key".into(),
            timeout: Duration::from_secs(5),
            list_unsubscribe: None,
            ca_file: None,
        })
        .unwrap();
        let (cmd, mut message) = email_to("tok-1");
        message.preheader = Some("3 items, 59.90 in total".into());
        message.unsubscribe_url = Some("https://shop.example/u?c=c1&s=s1".into());
        provider.send(&cmd, &message).await.expect("sent");
        let body = got.lock().expect("body").clone().expect("a request");
        assert_eq!(body["preheader"], "3 items, 59.90 in total");
        assert_eq!(body["title"], "Hello");
        assert_eq!(body["unsubscribe_url"], "https://shop.example/u?c=c1&s=s1");
        for (field, value) in [
            ("send_id", "s1"),
            ("customer_id", "c1"),
            ("scenario", "welcome"),
            ("category", "trigger"),
        ] {
            assert_eq!(body[field], value, "{field}");
        }
    }

    #[test]
    fn retry_after_is_read_as_seconds_or_a_date() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_764_950_000);
        assert_eq!(retry_after(" 30 ", now), Some(Duration::from_secs(30)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(120));
        assert_eq!(retry_after(&later, now), Some(Duration::from_secs(120)));
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(120));
        assert_eq!(retry_after(&earlier, now), None, "a date already past");
        assert_eq!(retry_after("soon", now), None);
        let wait = Some(Duration::from_secs(2));
        assert!(matches!(
            http_error(429, String::new(), wait),
            ProviderError::Throttled(_, w) if w == Duration::from_secs(2)
        ));
        assert!(matches!(
            http_error(503, String::new(), wait),
            ProviderError::Throttled(..)
        ));
        assert!(matches!(
            http_error(500, String::new(), wait),
            ProviderError::Transient(_)
        ));
    }

    #[test]
    fn only_410_from_the_gateway_is_a_hard_bounce_and_409_is_asked_again() {
        let kind = |status| match http_error(status, String::new(), None) {
            ProviderError::Transient(_) => "transient",
            ProviderError::Throttled(..) => "throttled",
            ProviderError::NoAnswer(_) => "no_answer",
            ProviderError::HardBounce(_) => "hard_bounce",
            ProviderError::Permanent(_) => "permanent",
            ProviderError::Refused(_) => "refused",
            ProviderError::InProgress(_) => "in_progress",
            ProviderError::RecipientDeferred(_) => "recipient_deferred",
        };
        assert_eq!(kind(410), "hard_bounce");
        assert_eq!(kind(404), "refused", "a missing route is no dead address");
        assert_eq!(kind(401), "refused", "nor are refused credentials");
        assert_eq!(kind(403), "refused");
        assert_eq!(kind(400), "permanent");
        assert_eq!(kind(408), "transient");
        assert_eq!(
            kind(409),
            "in_progress",
            "the key's first request is in progress"
        );
        assert_eq!(kind(302), "refused", "a redirect is a wrong URL");
        assert_eq!(kind(429), "transient");
        assert_eq!(kind(503), "transient");
        assert_eq!(kind(500), "transient");
        assert_eq!(
            kind(502),
            "no_answer",
            "a proxy's answer: the gateway may have it"
        );
        assert_eq!(kind(504), "no_answer");
    }
}
