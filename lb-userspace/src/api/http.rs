//! The remote API's HTTP/1.1 framing: [`parse`] reads one request (head and body) from the
//! bytes received so far, strictly (CRLF line ends, one `Content-Length`, no
//! `Transfer-Encoding`, bounded sizes), and [`response`] writes one answer. Pure functions
//! over byte slices, so the fuzz target drives exactly what the listener runs.

use super::MAX_REQUEST_BYTES;

/// Largest request head (request line and headers).
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Most header lines in a head.
pub const MAX_HEADERS: usize = 64;

/// One parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequest {
    pub method: String,
    pub path: String,
    /// The value of `Authorization`, if any.
    pub authorization: Option<String>,
    pub body: Vec<u8>,
}

impl HttpRequest {
    /// The bearer token of `Authorization: Bearer TOKEN` (scheme case-insensitive).
    #[must_use]
    pub fn bearer(&self) -> Option<&str> {
        let value = self.authorization.as_deref()?;
        let (scheme, token) = value.split_once(' ')?;
        let token = token.trim();
        (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
    }
}

/// What the bytes so far hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole request yet: read more.
    Incomplete,
    /// A whole request.
    Complete(HttpRequest),
}

/// Why a request is refused before it is looked at; each is an HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("malformed request: {0}")]
    BadRequest(&'static str),
    #[error("a POST needs a Content-Length")]
    LengthRequired,
    #[error("request body larger than {MAX_REQUEST_BYTES} bytes")]
    PayloadTooLarge,
    #[error(
        "request head larger than {MAX_HEAD_BYTES} bytes or with more than {MAX_HEADERS} headers"
    )]
    HeadTooLarge,
    #[error("Transfer-Encoding is not supported; send a Content-Length")]
    NotImplemented,
}

impl HttpError {
    #[must_use]
    pub const fn status(self) -> u16 {
        match self {
            Self::BadRequest(_) => 400,
            Self::LengthRequired => 411,
            Self::PayloadTooLarge => 413,
            Self::HeadTooLarge => 431,
            Self::NotImplemented => 501,
        }
    }
}

fn is_token_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

/// Parses the request at the start of `buf`.
pub fn parse(buf: &[u8]) -> Result<Parsed, HttpError> {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() > MAX_HEAD_BYTES {
            Err(HttpError::HeadTooLarge)
        } else {
            Ok(Parsed::Incomplete)
        };
    };
    if head_end > MAX_HEAD_BYTES {
        return Err(HttpError::HeadTooLarge);
    }
    let head = std::str::from_utf8(&buf[..head_end])
        .map_err(|_| HttpError::BadRequest("head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(path), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::BadRequest(
            "request line is not METHOD PATH VERSION",
        ));
    };
    if method.is_empty() || !method.bytes().all(is_token_char) {
        return Err(HttpError::BadRequest("invalid method"));
    }
    if !path.starts_with('/') || path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(HttpError::BadRequest("invalid path"));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(HttpError::BadRequest("not HTTP/1.0 or HTTP/1.1"));
    }
    let mut authorization = None;
    let mut length: Option<usize> = None;
    for (count, line) in lines.enumerate() {
        if count >= MAX_HEADERS {
            return Err(HttpError::HeadTooLarge);
        }
        if line.starts_with([' ', '\t']) {
            return Err(HttpError::BadRequest("folded header line"));
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(HttpError::BadRequest("header line without a colon"));
        };
        if name.is_empty() || !name.bytes().all(is_token_char) {
            return Err(HttpError::BadRequest("invalid header name"));
        }
        let value = value.trim_matches([' ', '\t']);
        if value.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
            return Err(HttpError::BadRequest("control character in a header value"));
        }
        if name.eq_ignore_ascii_case("content-length") {
            if length.is_some() {
                return Err(HttpError::BadRequest("more than one Content-Length"));
            }
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HttpError::BadRequest("invalid Content-Length"));
            }
            let n = value
                .parse::<usize>()
                .map_err(|_| HttpError::PayloadTooLarge)?;
            if n > MAX_REQUEST_BYTES {
                return Err(HttpError::PayloadTooLarge);
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::NotImplemented);
        } else if name.eq_ignore_ascii_case("authorization") {
            if authorization.is_some() {
                return Err(HttpError::BadRequest("more than one Authorization"));
            }
            authorization = Some(value.to_owned());
        }
    }
    let length = match (length, method) {
        (Some(n), _) => n,
        (None, "POST" | "PUT" | "PATCH") => return Err(HttpError::LengthRequired),
        (None, _) => 0,
    };
    let body_start = head_end + 4;
    let available = buf.len() - body_start;
    if available < length {
        return Ok(Parsed::Incomplete);
    }
    Ok(Parsed::Complete(HttpRequest {
        method: method.to_owned(),
        path: path.to_owned(),
        authorization,
        body: buf[body_start..body_start + length].to_vec(),
    }))
}

/// The reason phrase of the statuses the API sends.
#[must_use]
pub const fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        422 => "Unprocessable Content",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

/// A whole response with a JSON body; the connection closes after it.
#[must_use]
pub fn response(status: u16, body: &[u8]) -> Vec<u8> {
    let challenge = if status == 401 {
        "WWW-Authenticate: Bearer realm=\"weir\"\r\n"
    } else {
        ""
    };
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         {challenge}Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        reason(status),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// The status and body of a response (the client's side): `None` if it is not HTTP.
#[must_use]
pub fn parse_response(buf: &[u8]) -> Option<(u16, &[u8])> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..head_end]).ok()?;
    let status_line = head.split("\r\n").next()?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let status = parts.next()?.parse().ok()?;
    Some((status, &buf[head_end + 4..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(text: &str) -> HttpRequest {
        match parse(text.as_bytes()) {
            Ok(Parsed::Complete(request)) => request,
            other => panic!("{other:?} for {text:?}"),
        }
    }

    #[test]
    fn a_whole_request_parses() {
        let request = complete(
            "POST /v1/request HTTP/1.1\r\nHost: lb\r\nAuthorization: Bearer abc \r\n\
             Content-Length: 4\r\n\r\nbody",
        );
        assert_eq!(request.method, "POST");
        assert_eq!(request.path, "/v1/request");
        assert_eq!(request.bearer(), Some("abc"));
        assert_eq!(request.body, b"body");
        let get = complete("GET / HTTP/1.0\r\nauthorization: basic x\r\n\r\n");
        assert_eq!(get.bearer(), None);
        assert!(get.body.is_empty());
    }

    #[test]
    fn partial_requests_ask_for_more() {
        let text = b"POST /v1/request HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody";
        for end in 0..text.len() {
            assert_eq!(parse(&text[..end]), Ok(Parsed::Incomplete), "{end}");
        }
    }

    #[test]
    fn malformed_requests_are_refused() {
        for (text, status) in [
            ("POST /x HTTP/1.1\r\n\r\n", 411),
            (
                "POST /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
                400,
            ),
            ("POST /x HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
            (
                "POST /x HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
                413,
            ),
            ("POST /x HTTP/1.1\r\nContent-Length: 65537\r\n\r\n", 413),
            (
                "POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                501,
            ),
            ("POST /x HTTP/2\r\n\r\n", 400),
            ("POST x HTTP/1.1\r\n\r\n", 400),
            ("POST  /x HTTP/1.1\r\n\r\n", 400),
            ("GET /x HTTP/1.1\r\n folded\r\n\r\n", 400),
            ("GET /x HTTP/1.1\r\nnocolon\r\n\r\n", 400),
            (
                "GET /x HTTP/1.1\r\nAuthorization: a\r\nAuthorization: b\r\n\r\n",
                400,
            ),
            ("GET /x HTTP/1.1\r\nBad Name: a\r\n\r\n", 400),
        ] {
            let err = parse(text.as_bytes()).unwrap_err();
            assert_eq!(err.status(), status, "{text:?}: {err}");
        }
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_HEAD_BYTES));
        assert_eq!(parse(long.as_bytes()), Err(HttpError::HeadTooLarge));
        let many = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            "A: b\r\n".repeat(MAX_HEADERS + 1)
        );
        assert_eq!(parse(many.as_bytes()), Err(HttpError::HeadTooLarge));
    }

    #[test]
    fn responses_round_trip() {
        let out = response(401, b"{}");
        let (status, body) = parse_response(&out).unwrap();
        assert_eq!((status, body), (401, &b"{}"[..]));
        assert!(String::from_utf8_lossy(&out).contains("WWW-Authenticate: Bearer"));
        assert_eq!(parse_response(b"\x15\x03\x03\x00\x02\x02\x46"), None);
    }
}
