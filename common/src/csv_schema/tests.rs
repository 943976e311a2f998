//! Unit tests of the CSV contract: every bad input named in the issue, and the good ones.

use super::*;
use std::str::FromStr;

const HEADER: &str = "transaction_id,amount,currency,timestamp,merchant,status\n";

fn check(bytes: &[u8]) -> ValidationReport {
    validate(|| Ok(bytes), 100).unwrap()
}

fn check_str(s: &str) -> ValidationReport {
    check(s.as_bytes())
}

fn messages(r: &ValidationReport) -> Vec<String> {
    r.errors.iter().map(|e| format!("{}:{}:{}", e.row, e.column.as_deref().unwrap_or("-"), e.message)).collect()
}

fn one_error(r: &ValidationReport) -> &RowError {
    assert_eq!(r.error_count, 1, "{:?}", messages(r));
    &r.errors[0]
}

#[test]
fn a_good_file_passes() {
    let r = check_str(&format!(
        "{HEADER}t1,10.50,USD,2024-01-15T10:30:00Z,Acme,completed\nt2,-3,EUR,2024-01-15T10:30:00+02:00,Bob's,pending\nt3,+0.001,JPY,2024-02-29T00:00:00.123Z,X,failed\n"
    ));
    assert!(r.is_valid(), "{:?}", messages(&r));
    assert_eq!(r.row_count, 3);
}

#[test]
fn utf8_bom_crlf_quotes_and_embedded_newlines_are_fine() {
    let body = "\u{FEFF}transaction_id,amount,currency,timestamp,merchant,status\r\n\
                t1,10.50,USD,2024-01-15T10:30:00Z,\"Acme, Inc.\",completed\r\n\
                t2,1,USD,2024-01-15T10:30:00Z,\"Line one\nline \"\"two\"\"\",pending\r\n";
    let r = check_str(body);
    assert!(r.is_valid(), "{:?}", messages(&r));
    assert_eq!(r.row_count, 2);
}

#[test]
fn extra_and_reordered_columns_are_fine() {
    let r = check_str(
        "status,note,merchant,timestamp,currency,amount,transaction_id\ncompleted,hi,Acme,2024-01-15T10:30:00Z,GBP,1.00,t1\n",
    );
    assert!(r.is_valid(), "{:?}", messages(&r));
}

#[test]
fn missing_columns_are_named() {
    let r = check_str("transaction_id,amount,currency\nt1,1,USD\n");
    let e = one_error(&r);
    assert_eq!(e.row, 0);
    assert!(e.message.contains("timestamp, merchant, status"), "{}", e.message);
}

#[test]
fn a_duplicated_header_column_is_an_error() {
    let r = check_str("transaction_id,amount,amount,currency,timestamp,merchant,status\nt1,1,2,USD,2024-01-15T10:30:00Z,m,completed\n");
    assert!(one_error(&r).message.contains("more than once"));
}

#[test]
fn empty_fields_are_errors() {
    let r = check_str(&format!("{HEADER}t1,,USD,2024-01-15T10:30:00Z,,completed\n"));
    assert_eq!(messages(&r), ["1:amount:amount is empty", "1:merchant:merchant is empty"]);
}

#[test]
fn amounts_must_be_exact_decimals() {
    for bad in ["NaN", "inf", "-Infinity", "1e5", "1.2.3", "12,5", "$5", "1_000", ".5", "5.", "0x10", "--1"] {
        let r = check_str(&format!("{HEADER}t1,\"{bad}\",USD,2024-01-15T10:30:00Z,m,completed\n"));
        let e = one_error(&r);
        assert_eq!(e.column.as_deref(), Some("amount"), "{bad}");
        assert!(e.message.contains("not a decimal"), "{bad}: {}", e.message);
    }
    let r = check_str(&format!("{HEADER}t1,123456789012345678901234567890123,USD,2024-01-15T10:30:00Z,m,completed\n"));
    assert!(one_error(&r).message.contains("more digits"));
}

#[test]
fn amounts_keep_their_exact_value() {
    let data = format!("{HEADER}t1,0.1,USD,2024-01-15T10:30:00Z,m,completed\n");
    let mut s = Scanner::new(data.as_bytes()).unwrap();
    assert!(s.advance().unwrap());
    let mut log = ErrorLog::new(10);
    let row = s.parse(&mut log).unwrap();
    assert_eq!(row.amount, Decimal::from_str("0.1").unwrap());
    assert_eq!(row.amount.to_string(), "0.1");
}

#[test]
fn currencies_must_be_iso_4217() {
    for bad in ["usd", "US", "DOLLARS", "ABC", "XXX"] {
        let r = check_str(&format!("{HEADER}t1,1,{bad},2024-01-15T10:30:00Z,m,completed\n"));
        assert_eq!(one_error(&r).column.as_deref(), Some("currency"), "{bad}");
    }
}

#[test]
fn timestamps_must_be_rfc_3339() {
    for bad in [
        "2024-01-15",
        "2024-01-15 10:30",
        "15/01/2024 10:30",
        "1705314600",
        "2024-13-01T00:00:00Z",
        "2024-01-15T10:30:00",
    ] {
        let r = check_str(&format!("{HEADER}t1,1,USD,{bad},m,completed\n"));
        assert_eq!(one_error(&r).column.as_deref(), Some("timestamp"), "{bad}");
    }
}

#[test]
fn statuses_are_a_closed_set() {
    for bad in ["COMPLETED", "done", "cancelled"] {
        let r = check_str(&format!("{HEADER}t1,1,USD,2024-01-15T10:30:00Z,m,{bad}\n"));
        assert!(one_error(&r).message.contains("completed, pending, failed"), "{bad}");
    }
}

#[test]
fn duplicate_ids_are_found_with_the_first_row() {
    let r = check_str(&format!(
        "{HEADER}a,1,USD,2024-01-15T10:30:00Z,m,completed\nb,1,USD,2024-01-15T10:30:00Z,m,completed\na,2,USD,2024-01-15T10:30:00Z,m,completed\n"
    ));
    assert_eq!(messages(&r), ["3:transaction_id:transaction_id 'a' already appears in row 1"]);
}

#[test]
fn invalid_utf8_is_reported_per_field() {
    let mut body = HEADER.as_bytes().to_vec();
    body.extend_from_slice(b"t1,1,USD,2024-01-15T10:30:00Z,caf\xe9,completed\n");
    let r = check(&body);
    let e = one_error(&r);
    assert_eq!((e.row, e.column.as_deref()), (1, Some("merchant")));
    assert!(e.message.contains("UTF-8"));
}

#[test]
fn a_ragged_row_is_an_error() {
    let r = check_str(&format!("{HEADER}t1,1,USD\nt2,1,USD,2024-01-15T10:30:00Z,m,completed,extra\n"));
    assert_eq!(r.error_count, 2);
    assert!(r.errors[0].message.contains("3 fields but the header has 6"), "{:?}", messages(&r));
}

#[test]
fn header_only_and_empty_files_are_rejected() {
    let r = check_str(HEADER);
    assert!(one_error(&r).message.contains("no data rows"));
    let r = check_str("");
    assert!(one_error(&r).message.contains("empty"));
}

#[test]
fn binary_garbage_is_rejected_not_crashed_on() {
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let r = check(&garbage);
    assert!(!r.is_valid());
    assert!(r.errors[0].message.contains("lacks required column"), "{:?}", messages(&r));
}

#[test]
fn thousands_of_bad_rows_are_all_counted_and_the_list_capped() {
    let mut body = String::from(HEADER);
    for i in 0..5000 {
        body.push_str(&format!("t{i},oops,USD,2024-01-15T10:30:00Z,m,completed\n"));
    }
    let r = validate(|| Ok(body.as_bytes()), 100).unwrap();
    assert_eq!(r.row_count, 5000);
    assert_eq!(r.error_count, 5000);
    assert_eq!(r.errors.len(), 100);
    assert_eq!(r.errors[99].row, 100);
}

#[test]
fn duplicates_merge_with_other_errors_in_row_order() {
    let mut body = String::from(HEADER);
    body.push_str("a,1,USD,2024-01-15T10:30:00Z,m,completed\n");
    for _ in 0..3 {
        body.push_str("a,x,USD,2024-01-15T10:30:00Z,m,completed\n");
    }
    let r = validate(|| Ok(body.as_bytes()), 4).unwrap();
    assert_eq!(r.error_count, 6);
    let rows: Vec<_> = r.errors.iter().map(|e| (e.row, e.column.clone().unwrap())).collect();
    assert_eq!(
        rows,
        [(2, "amount".into()), (2, "transaction_id".into()), (3, "amount".into()), (3, "transaction_id".into())]
    );
}

#[test]
fn whitespace_around_values_is_ignored() {
    let r = check_str(&format!("{HEADER} t1 , 10.50 , USD , 2024-01-15T10:30:00Z , Acme , completed \n"));
    assert!(r.is_valid(), "{:?}", messages(&r));
}

#[test]
fn an_unclosed_quote_in_a_large_file_is_a_clear_error_not_a_memory_blowup() {
    let mut body = String::from(HEADER);
    body.push_str("t1,1,USD,2024-01-15T10:30:00Z,\"never closed,completed\n");
    for i in 0..100_000 {
        body.push_str(&format!("t{i},1,USD,2024-01-15T10:30:00Z,m,completed\n"));
    }
    assert!(body.len() as u64 > 3 * MAX_RECORD_BYTES);
    let r = check_str(&body);
    let e = one_error(&r);
    assert_eq!(e.row, 1);
    assert!(e.message.contains("quote left open"), "{}", e.message);
}

#[test]
fn values_at_the_size_limits_pass() {
    // multi-byte characters: the limits count bytes, not characters
    let id = "é".repeat(MAX_TRANSACTION_ID_BYTES / 2);
    let merchant = "m".repeat(MAX_FIELD_BYTES);
    let fixed = ",1,USD,2024-01-15T10:30:00Z,,completed,".len() + id.len() + merchant.len();
    let extra = "x".repeat(MAX_ROW_BYTES - fixed);
    let body = format!("{HEADER_X}{id},1,USD,2024-01-15T10:30:00Z,{merchant},completed,{extra}\n");
    let r = check_str(&body);
    assert!(r.is_valid(), "{:?}", messages(&r));
}

const HEADER_X: &str = "transaction_id,amount,currency,timestamp,merchant,status,note\n";

#[test]
fn one_byte_over_a_size_limit_is_a_row_error_naming_the_limit() {
    let id = format!("a{}", "é".repeat(MAX_TRANSACTION_ID_BYTES / 2));
    let r = check_str(&format!("{HEADER}{id},1,USD,2024-01-15T10:30:00Z,m,completed\n"));
    let e = one_error(&r);
    assert_eq!((e.row, e.column.as_deref()), (1, Some("transaction_id")));
    assert!(e.message.contains("is 257 bytes long; the limit is 256 bytes"), "{}", e.message);
    assert!(e.message.len() < 200, "the value is quoted short: {}", e.message);

    let merchant = "m".repeat(MAX_FIELD_BYTES + 1);
    let r = check_str(&format!("{HEADER}t1,1,USD,2024-01-15T10:30:00Z,{merchant},completed\n"));
    let e = one_error(&r);
    assert_eq!(e.column.as_deref(), Some("merchant"));
    assert!(e.message.contains("is 1025 bytes long; the limit is 1024 bytes"), "{}", e.message);

    // any required field, not only merchant: only the size is reported, not its shape
    let amount = "1".repeat(MAX_FIELD_BYTES + 1);
    let r = check_str(&format!("{HEADER}t1,{amount},USD,2024-01-15T10:30:00Z,m,completed\n"));
    assert!(one_error(&r).message.starts_with("amount '111"), "{:?}", messages(&r));

    let fixed = "t1,1,USD,2024-01-15T10:30:00Z,m,completed,".len();
    let extra = "x".repeat(MAX_ROW_BYTES - fixed + 1);
    let r = check_str(&format!("{HEADER_X}t1,1,USD,2024-01-15T10:30:00Z,m,completed,{extra}\n"));
    let e = one_error(&r);
    assert_eq!((e.row, e.column.as_deref()), (1, None));
    assert!(e.message.contains("the row is 8193 bytes long") && e.message.contains("limit is 8192"), "{}", e.message);
}

#[test]
fn rows_up_to_the_reader_limit_are_reported_and_scanning_goes_on() {
    let merchant = "m".repeat(200_000);
    let body = format!(
        "{HEADER}t1,1,USD,2024-01-15T10:30:00Z,{merchant},completed\nt2,1,USD,2024-01-15T10:30:00Z,m,completed\nt3,x,USD,2024-01-15T10:30:00Z,m,completed\n"
    );
    let r = check_str(&body);
    let cells: Vec<_> = r.errors.iter().map(|e| (e.row, e.column.as_deref())).collect();
    assert_eq!(cells, [(1, None), (1, Some("merchant")), (3, Some("amount"))], "{:?}", messages(&r));
    assert_eq!(r.row_count, 3);
}

#[test]
fn quoted_values_are_short_whatever_they_hold() {
    for value in ["\u{1}".repeat(5000), "é".repeat(5000), "x".repeat(5000)] {
        let shown = show(&value);
        assert!(shown.len() <= SHOW_MAX_BYTES + '…'.len_utf8(), "{} bytes", shown.len());
        assert!(shown.ends_with('…'));
    }
    assert_eq!(show("a\tb"), "a\\tb");
}
