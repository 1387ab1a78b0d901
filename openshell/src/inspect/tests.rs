use super::*;

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).expect("name"),
            HeaderValue::from_str(v).expect("value"),
        );
    }
    h
}

#[test]
fn ambiguous_framing_is_named() {
    assert_eq!(framing_problem(&headers(&[("content-length", "3")])), None);
    assert_eq!(
        framing_problem(&headers(&[
            ("content-length", "3"),
            ("content-length", "3")
        ])),
        Some("more than one Content-Length header")
    );
    assert_eq!(
        framing_problem(&headers(&[
            ("content-length", "3"),
            ("transfer-encoding", "chunked")
        ])),
        Some("Content-Length together with Transfer-Encoding")
    );
    assert_eq!(
        framing_problem(&headers(&[("transfer-encoding", "chunked")])),
        None
    );
}

#[test]
fn hop_by_hop_headers_and_the_ones_connection_names_are_dropped() {
    let mut h = headers(&[
        ("connection", "keep-alive, x-secret"),
        ("x-secret", "1"),
        ("keep-alive", "timeout=5"),
        ("upgrade", "h2c"),
        ("accept", "*/*"),
    ]);
    strip_hop_by_hop(&mut h);
    let left: Vec<_> = h.keys().map(|k| k.as_str().to_owned()).collect();
    assert_eq!(left, vec!["accept"]);
}

#[test]
fn denial_reasons_read_method_path_not_permitted() {
    let r = Reason::RequestNotPermitted {
        block: Arc::from("github_repos"),
        method: "DELETE".to_owned(),
        path: "/repos/o/bravo-repo".to_owned(),
    };
    assert_eq!(
        reason_text(&r),
        "DELETE /repos/o/bravo-repo not permitted by block github_repos"
    );
}
