//! A scripted SMTP server for the crate's tests: a real server on a local port that
//! answers as each test needs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// A scripted SMTP server on a local port: each session greets, answers EHLO, MAIL,
/// RCPT (with `rcpt_reply`), DATA and NOOP, and counts the messages it keeps. A
/// session closes after its first message when `close_after_message` (a server's
/// idle timeout, early); a QUIT is never answered when `answer_quit` is false.
pub async fn scripted_smtp(
    rcpt_reply: &'static str,
    close_after_message: bool,
    answer_quit: bool,
) -> (u16, Arc<AtomicUsize>) {
    scripted_smtp_by_rcpt(move |_| rcpt_reply, close_after_message, answer_quit).await
}

/// [`scripted_smtp`] answering the `n`th RCPT TO (from 0, over every session) with
/// `rcpt_reply(n)`.
pub async fn scripted_smtp_by_rcpt(
    rcpt_reply: impl Fn(usize) -> &'static str + Send + Sync + 'static,
    close_after_message: bool,
    answer_quit: bool,
) -> (u16, Arc<AtomicUsize>) {
    let rcpt_reply = Arc::new(rcpt_reply);
    let rcpts = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let messages = Arc::new(AtomicUsize::new(0));
    let kept = messages.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let (kept, rcpt_reply, rcpts) = (kept.clone(), rcpt_reply.clone(), rcpts.clone());
            tokio::spawn(async move {
                let (read, mut write) = socket.into_split();
                let mut lines = BufReader::new(read).lines();
                write.write_all(b"220 test ready\r\n").await.unwrap();
                while let Ok(Some(line)) = lines.next_line().await {
                    let verb = line.split(' ').next().unwrap_or("").to_ascii_uppercase();
                    let reply = match verb.as_str() {
                        "EHLO" | "HELO" | "MAIL" | "NOOP" => "250 ok\r\n".to_string(),
                        "RCPT" => {
                            format!("{}\r\n", rcpt_reply(rcpts.fetch_add(1, Ordering::SeqCst)))
                        }
                        "DATA" => {
                            write.write_all(b"354 go on\r\n").await.unwrap();
                            while let Ok(Some(body)) = lines.next_line().await {
                                if body == "." {
                                    break;
                                }
                            }
                            kept.fetch_add(1, Ordering::SeqCst);
                            write.write_all(b"250 queued\r\n").await.unwrap();
                            if close_after_message {
                                return;
                            }
                            continue;
                        }
                        "QUIT" if answer_quit => {
                            let _ = write.write_all(b"221 bye\r\n").await;
                            return;
                        }
                        "QUIT" => {
                            tokio::time::sleep(Duration::from_secs(600)).await;
                            return;
                        }
                        _ => "500 what\r\n".to_string(),
                    };
                    if write.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, messages)
}
