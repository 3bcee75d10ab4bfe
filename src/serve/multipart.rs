//! `multipart/form-data` request bodies (RFC 7578), as the OpenAI clients send file uploads
//! (`POST /v1/images/edits`). The body is already buffered under the intake's caps
//! ([`super::intake`]); this splits it into its fields without copying, bounded in the number
//! of fields and the size of each field's header block, and answers malformed input with a
//! 400 (an unsupported content type with a 415). It never panics (`tests/fuzz.rs` feeds it
//! mutated bodies).

use memchr::memmem;

use super::ApiError;

/// Most fields one body may hold.
pub const MAX_FIELDS: usize = 64;
/// Largest header block of one field, in bytes.
const MAX_FIELD_HEAD: usize = 8 << 10;

/// One field of a form: its name, the file name of a file field, its content type, and its
/// bytes (a slice of the body).
#[derive(Debug, PartialEq)]
pub struct Field<'a> {
    pub name: String,
    pub filename: Option<String>,
    pub content_type: Option<String>,
    pub data: &'a [u8],
}

impl Field<'_> {
    /// The field's value as text (400 naming it when it is not UTF-8).
    pub fn text(&self) -> Result<&str, ApiError> {
        std::str::from_utf8(self.data).map_err(|_| {
            ApiError::bad(format!("form field `{}` is not UTF-8 text", self.name))
                .with_param(&self.name)
        })
    }
}

/// The boundary of a `Content-Type: multipart/form-data; boundary=…` header value (415 for
/// another type, 400 without a valid boundary: 1 to 70 characters).
pub fn boundary(content_type: &str) -> Result<String, ApiError> {
    let mut params = content_type.split(';');
    let mime = params.next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("multipart/form-data") {
        return Err(ApiError::unsupported(format!(
            "Content-Type {mime:?}: this endpoint takes multipart/form-data"
        )));
    }
    for p in params {
        if let Some((k, v)) = p.split_once('=') {
            if k.trim().eq_ignore_ascii_case("boundary") {
                let b = unquote(v.trim());
                if b.is_empty() || b.len() > 70 || b.contains(['\r', '\n']) {
                    return Err(ApiError::bad(format!(
                        "multipart boundary {b:?} must have 1 to 70 characters"
                    )));
                }
                return Ok(b);
            }
        }
    }
    Err(ApiError::bad(
        "Content-Type multipart/form-data without a boundary parameter",
    ))
}

fn unquote(v: &str) -> String {
    match v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(inner) => inner.replace("\\\"", "\"").replace("\\\\", "\\"),
        None => v.to_string(),
    }
}

fn malformed(why: impl std::fmt::Display) -> ApiError {
    ApiError::bad(format!("malformed multipart/form-data body: {why}"))
}

/// The fields of `body`, in order.
pub fn parse<'a>(body: &'a [u8], boundary: &str) -> Result<Vec<Field<'a>>, ApiError> {
    let delim = format!("--{boundary}");
    let next_delim = format!("\r\n--{boundary}");
    // The first delimiter starts the body or a line (a preamble before it is ignored).
    let mut at = if body.starts_with(delim.as_bytes()) {
        delim.len()
    } else {
        memmem::find(body, next_delim.as_bytes())
            .map(|i| i + next_delim.len())
            .ok_or_else(|| malformed("no boundary delimiter"))?
    };
    let mut fields = Vec::new();
    loop {
        let rest = body.get(at..).unwrap_or(&[]);
        if rest.starts_with(b"--") {
            return Ok(fields); // the close delimiter (an epilogue after it is ignored)
        }
        // Transport padding, then the line break that ends the delimiter line.
        let pad = rest
            .iter()
            .take_while(|&&c| c == b' ' || c == b'\t')
            .count();
        let rest = &rest[pad..];
        if !rest.starts_with(b"\r\n") {
            return Err(malformed(
                "a boundary delimiter is not followed by a line break",
            ));
        }
        at += pad + 2;
        if fields.len() == MAX_FIELDS {
            return Err(malformed(format!("more than {MAX_FIELDS} fields")));
        }
        let part = body.get(at..).unwrap_or(&[]);
        let head_len = if part.starts_with(b"\r\n") {
            0
        } else {
            memmem::find(part, b"\r\n\r\n")
                .map(|i| i + 2)
                .ok_or_else(|| malformed("a field's headers do not end"))?
        };
        if head_len > MAX_FIELD_HEAD {
            return Err(malformed(format!(
                "a field's headers are longer than {MAX_FIELD_HEAD} bytes"
            )));
        }
        let head = std::str::from_utf8(&part[..head_len])
            .map_err(|_| malformed("a field's headers are not UTF-8"))?;
        let data_start = at + head_len + 2;
        let data_part = body.get(data_start..).unwrap_or(&[]);
        let data_len = memmem::find(data_part, next_delim.as_bytes())
            .ok_or_else(|| malformed("a field is not closed by a boundary delimiter"))?;
        fields.push(field(head, &data_part[..data_len])?);
        at = data_start + data_len + next_delim.len();
    }
}

/// A field from its header block and bytes.
fn field<'a>(head: &str, data: &'a [u8]) -> Result<Field<'a>, ApiError> {
    let mut name = None;
    let mut filename = None;
    let mut content_type = None;
    for line in head.split("\r\n").filter(|l| !l.is_empty()) {
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| malformed(format!("header line {line:?} has no colon")))?;
        let k = k.trim();
        if k.eq_ignore_ascii_case("content-disposition") {
            let mut params = v.split(';');
            let kind = params.next().unwrap_or("").trim();
            if !kind.eq_ignore_ascii_case("form-data") {
                return Err(malformed(format!(
                    "Content-Disposition {kind:?} is not form-data"
                )));
            }
            for p in params {
                let Some((pk, pv)) = p.split_once('=') else {
                    continue;
                };
                match pk.trim().to_ascii_lowercase().as_str() {
                    "name" => name = Some(unquote(pv.trim())),
                    "filename" => filename = Some(unquote(pv.trim())),
                    _ => {}
                }
            }
        } else if k.eq_ignore_ascii_case("content-type") {
            content_type = Some(v.trim().to_string());
        }
    }
    let name = name.ok_or_else(|| malformed("a field without a Content-Disposition name"))?;
    Ok(Field {
        name,
        filename,
        content_type,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
        let mut b = Vec::new();
        for (name, file, data) in parts {
            b.extend_from_slice(b"--XyZ\r\n");
            let disp = match file {
                Some(f) => format!("form-data; name=\"{name}\"; filename=\"{f}\""),
                None => format!("form-data; name=\"{name}\""),
            };
            b.extend_from_slice(format!("Content-Disposition: {disp}\r\n").as_bytes());
            if file.is_some() {
                b.extend_from_slice(b"Content-Type: image/png\r\n");
            }
            b.extend_from_slice(b"\r\n");
            b.extend_from_slice(data);
            b.extend_from_slice(b"\r\n");
        }
        b.extend_from_slice(b"--XyZ--\r\n");
        b
    }

    #[test]
    fn fields_come_back_in_order_with_their_bytes() {
        let png: &[u8] = b"\x89PNG\r\n--Xy\r\n\r\nbinary";
        let b = body(&[
            ("prompt", None, b"It is running"),
            ("image[]", Some("a.png"), png),
            ("n", None, b"2"),
        ]);
        let f = parse(&b, "XyZ").unwrap();
        assert_eq!(f.len(), 3);
        assert_eq!(
            (f[0].name.as_str(), f[0].data),
            ("prompt", &b"It is running"[..])
        );
        assert_eq!(f[1].filename.as_deref(), Some("a.png"));
        assert_eq!(f[1].content_type.as_deref(), Some("image/png"));
        assert_eq!(f[1].data, png);
        assert_eq!(f[2].text().unwrap(), "2");
    }

    #[test]
    fn boundaries_and_broken_bodies_are_refused_with_4xx() {
        assert_eq!(
            boundary("multipart/form-data; boundary=\"a b\"").unwrap(),
            "a b"
        );
        assert_eq!(boundary("application/json").unwrap_err().status, 415);
        assert_eq!(boundary("multipart/form-data").unwrap_err().status, 400);
        let long = format!("multipart/form-data; boundary={}", "b".repeat(71));
        assert_eq!(boundary(&long).unwrap_err().status, 400);
        let good = body(&[("prompt", None, b"x")]);
        // Every truncation of a good body is an error or the fields before the cut, never a
        // panic.
        for n in 0..good.len() {
            let _ = parse(&good[..n], "XyZ");
        }
        assert!(parse(b"no delimiter here", "XyZ").is_err());
        assert!(parse(
            b"--XyZ\r\nContent-Disposition: form-data\r\n\r\nx\r\n--XyZ--",
            "XyZ"
        )
        .is_err());
        let many: Vec<(&str, Option<&str>, &[u8])> = (0..MAX_FIELDS + 1)
            .map(|_| ("n", None, &b"1"[..]))
            .collect();
        assert!(parse(&body(&many), "XyZ").is_err());
    }
}
