//! `POST /v1/chat/completions`: a question about an image (image parts in the messages),
//! answered at once or streamed as server-sent events, one chunk per token.

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use crate::pipeline::RequestHandle;
use crate::serve::state::*;
use crate::serve::validate::*;
use crate::serve::ApiError;
use lavit_runtime::messages::Output;

pub(crate) async fn chat(
    req: HttpRequest,
    body: web::Bytes,
    st: web::Data<AppState>,
) -> HttpResponse {
    chat_inner(req, body, st)
        .await
        .unwrap_or_else(|e| e.response())
}

/// OpenAI's `usage` object.
fn usage(prompt_tokens: Option<usize>, completion: usize) -> serde_json::Value {
    let prompt = prompt_tokens.unwrap_or(0);
    json!({"prompt_tokens": prompt, "completion_tokens": completion,
           "total_tokens": prompt + completion})
}

/// `length` when the reply used every token it was allowed, else `stop`.
fn finish_reason(ids: &[i64], max_new_tokens: usize) -> &'static str {
    if ids.len() >= max_new_tokens {
        "length"
    } else {
        "stop"
    }
}

async fn chat_inner(req: HttpRequest, body: web::Bytes, st: web::Data<AppState>) -> Reply {
    st.authorize(&req)?;
    let r: ChatRequest = parse_json(&body)?;
    st.check_model(r.model.as_deref())?;
    let ChatPlan {
        question,
        image,
        opts,
        stream,
        include_usage,
    } = chat_plan(r, &st.limits)?;
    let ticket = st.pipe.admit()?;
    let pixels = decode_and_preprocess(&st, vec![("image".into(), image)]).await?;
    let max_new_tokens = opts.max_new_tokens;
    let mut handle = st
        .pipe
        .start_caption(ticket, pixels, question, opts)
        .await?;
    let id = format!("chatcmpl-{}", handle.id);
    let model = st.limits.model_id.clone();
    let created = now_secs();
    if !stream {
        return match wait_watching(&req, &mut handle).await? {
            Output::Text {
                text,
                ids,
                prompt_tokens,
            } => Ok(HttpResponse::Ok().json(json!({
                "id": id, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish_reason(&ids, max_new_tokens),
                             "logprobs": null}],
                "usage": usage(prompt_tokens, ids.len()),
            }))),
            _ => Err(ApiError::internal("stage", "the pipeline returned no text")),
        };
    }
    // SSE: a role chunk, one chunk per token, a finish chunk, the usage chunk (empty choices)
    // when asked, then [DONE]. Dropping the stream (client gone) drops the handle, which
    // cancels the request.
    let chunk = move |choices: serde_json::Value, usage: Option<serde_json::Value>| {
        let mut ev = json!({"id": id, "object": "chat.completion.chunk", "created": created,
                            "model": model, "choices": choices});
        if include_usage {
            ev["usage"] = usage.unwrap_or(serde_json::Value::Null);
        }
        format!("data: {ev}\n\n")
    };
    enum Phase {
        Start,
        Tokens,
        Done,
    }
    struct S<F> {
        handle: RequestHandle,
        chunk: F,
        phase: Phase,
        st: web::Data<AppState>,
    }
    let stream = futures::stream::unfold(
        S {
            handle,
            chunk,
            phase: Phase::Start,
            st: st.clone(),
        },
        move |mut s| async move {
            let out = match s.phase {
                Phase::Done => return None,
                Phase::Start => {
                    s.phase = Phase::Tokens;
                    (s.chunk)(
                        json!([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                "finish_reason": null, "logprobs": null}]),
                        None,
                    )
                }
                Phase::Tokens => {
                    let next = match s.handle.tokens.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => None,
                    };
                    if let Some(tok) = next {
                        (s.chunk)(
                            json!([{"index": 0, "delta": {"content": tok.text},
                                    "finish_reason": null, "logprobs": null}]),
                            None,
                        )
                    } else {
                        s.phase = Phase::Done;
                        match s.handle.wait().await {
                            Ok(Output::Text {
                                ids, prompt_tokens, ..
                            }) => {
                                let mut o = (s.chunk)(
                                    json!([{"index": 0, "delta": {},
                                            "finish_reason": finish_reason(&ids, max_new_tokens),
                                            "logprobs": null}]),
                                    None,
                                );
                                if include_usage {
                                    o.push_str(&(s.chunk)(
                                        json!([]),
                                        Some(usage(prompt_tokens, ids.len())),
                                    ));
                                }
                                o + "data: [DONE]\n\n"
                            }
                            other => {
                                let e = match other {
                                    Err(e) => ApiError::from(e),
                                    Ok(_) => {
                                        ApiError::internal("stage", "unexpected pipeline output")
                                    }
                                };
                                // The 200 head is sent: count the failure here.
                                if let Some(kind) = e.internal {
                                    s.st.metrics.internal_error(kind);
                                }
                                format!("data: {}\n\ndata: [DONE]\n\n", e.body())
                            }
                        }
                    }
                }
            };
            Some((Ok::<_, actix_web::Error>(web::Bytes::from(out)), s))
        },
    );
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("cache-control", "no-cache"))
        .streaming(stream))
}
