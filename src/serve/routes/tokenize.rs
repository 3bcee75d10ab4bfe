//! `POST /v1/tokenize`: images → their dynamic visual tokens (and the selector's keep mask).

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use crate::serve::state::*;
use crate::serve::validate::*;
use crate::serve::ApiError;
use lavit_runtime::messages::Output;

pub(crate) async fn tokenize(
    req: HttpRequest,
    body: web::Bytes,
    st: web::Data<AppState>,
) -> HttpResponse {
    tokenize_inner(req, body, st)
        .await
        .unwrap_or_else(|e| e.response())
}

/// `POST /v1/tokenize`: per image its visual ids and their count, and the `selection` the
/// decisions were taken with (`{"selection": "argmax"|"gumbel", "seed": N}`: the request's
/// `selection` / `seed`, else the served default, the checkpoint manifest's); with
/// `"keep_mask": true` also the selector's keep mask over the patch grid (`keep`: 0/1 per
/// patch in raster order, `grid`: [rows, cols]), which the playground draws.
async fn tokenize_inner(req: HttpRequest, body: web::Bytes, st: web::Data<AppState>) -> Reply {
    st.authorize(&req)?;
    let r: TokenizeRequest = parse_json(&body)?;
    let keep_mask = r.keep_mask;
    let selection = tokenize_selection(&r, st.pipe.info().selection)?;
    let used = selection.unwrap_or(st.pipe.info().selection);
    let list = tokenize_images(r, &st.limits)?;
    let ticket = st.pipe.admit()?;
    let named = list
        .into_iter()
        .enumerate()
        .map(|(i, b)| (format!("images[{i}]"), b))
        .collect();
    let pixels = decode_and_preprocess(&st, named).await?;
    let mut handle = st
        .pipe
        .start_tokenize(ticket, pixels, selection, keep_mask)
        .await?;
    match wait_watching(&req, &mut handle).await? {
        Output::VisualIds(ids) => {
            let counts: Vec<usize> = ids.iter().map(Vec::len).collect();
            Ok(HttpResponse::Ok()
                .json(json!({ "tokens": ids, "counts": counts, "selection": used })))
        }
        Output::Selection { ids, .. } if !keep_mask => {
            let counts: Vec<usize> = ids.iter().map(Vec::len).collect();
            Ok(HttpResponse::Ok()
                .json(json!({ "tokens": ids, "counts": counts, "selection": used })))
        }
        Output::Selection { ids, keep } => {
            let counts: Vec<usize> = ids.iter().map(Vec::len).collect();
            let n = keep.first().map_or(0, Vec::len);
            let side = (n as f64).sqrt().round() as usize;
            let grid = if side * side == n {
                [side, side]
            } else {
                [1, n]
            };
            let keep: Vec<Vec<u8>> = keep
                .iter()
                .map(|row| row.iter().map(|&k| k as u8).collect())
                .collect();
            Ok(HttpResponse::Ok().json(json!({
                "tokens": ids, "counts": counts, "keep": keep, "grid": grid, "patches": n,
                "selection": used,
            })))
        }
        _ => Err(ApiError::internal(
            "stage",
            "the pipeline returned no visual ids",
        )),
    }
}
