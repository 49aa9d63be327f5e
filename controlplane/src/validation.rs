// LEAD-STUB
use serde_json::Value;
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    pub field: String,
    pub reason: FieldReason,
    pub message: String,
}
#[derive(Debug, Clone, PartialEq)]
pub enum FieldReason {
    Required,
    Invalid,
}
impl FieldReason {
    pub fn as_cause_type(&self) -> &'static str {
        "x"
    }
}
pub fn validate(_k: &str, _o: &Value, _old: Option<&Value>) -> Vec<FieldError> {
    vec![]
}
