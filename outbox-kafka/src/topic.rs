//! Topics: Kafka's topic-name rules ([`check_topic_name`]) and creating
//! destination topics with an admin client ([`ensure_topic`]).

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::Settings;
use crate::error::{Error, Result};

/// Kafka's limit on topic name length.
const MAX_TOPIC_LEN: usize = 249;

/// Extra time, past the admin request's own timeout, before we stop waiting.
const GRACE: Duration = Duration::from_secs(5);

/// Creates `topic` unless it exists (`true` when this call created it), with
/// an admin client built from `settings`: the body of
/// [`KafkaBroker::ensure_topic`](crate::KafkaBroker::ensure_topic), which
/// documents the checks and the timeout.
pub(crate) async fn ensure_topic(
    settings: &Settings,
    topic: &str,
    partitions: i32,
    replication: i32,
) -> Result<bool> {
    let fail = |reason: String, source: Option<KafkaError>| Error::CreateTopic {
        topic: topic.to_owned(),
        bootstrap: settings.bootstrap.clone(),
        reason,
        source: source.map(Box::new),
    };
    if let Err(reason) = check_topic_name(topic) {
        return Err(fail(reason, None));
    }
    if partitions < 1 || replication < 1 {
        return Err(fail(
            format!(
                "partitions ({partitions}) and replication ({replication}) must both be at \
                     least 1"
            ),
            None,
        ));
    }
    let admin: AdminClient<DefaultClientContext> = settings
        .admin_config()?
        .create()
        .map_err(|e| settings.config_error(e))?;
    let timeout = settings.connect_timeout;
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(replication));
    let opts = AdminOptions::new()
        .request_timeout(Some(timeout))
        .operation_timeout(Some(timeout));
    let answer = tokio::time::timeout(timeout + GRACE, admin.create_topics([&new], &opts)).await;
    // Dropping a client joins its background thread: not on the runtime.
    tokio::task::spawn_blocking(move || drop(admin));
    let results = match answer {
        Ok(Ok(results)) => results,
        Ok(Err(e)) => {
            return Err(fail(
                format!(
                    "CreateTopics failed (check that the brokers are reachable within \
                         {timeout:?} (connect_timeout) and that this client may create topics)"
                ),
                Some(e),
            ));
        }
        Err(_elapsed) => {
            return Err(fail(
                format!(
                    "no answer to CreateTopics within {:?}; are the brokers reachable?",
                    timeout + GRACE
                ),
                Some(KafkaError::AdminOp(RDKafkaErrorCode::OperationTimedOut)),
            ));
        }
    };
    let mut created = false;
    for result in results {
        match result {
            Ok(_) => created = true,
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => {
                return Err(fail(
                    "the cluster refused it".to_owned(),
                    Some(KafkaError::AdminOp(code)),
                ));
            }
        }
    }
    if created {
        tracing::info!(
            transport = %settings.name,
            topic,
            partitions,
            replication,
            "created Kafka topic"
        );
    }
    Ok(created)
}

/// Kafka's own rule for topic names (`Topic.validate` in the Java client).
pub(crate) fn check_topic_name(topic: &str) -> std::result::Result<(), String> {
    if topic.is_empty() {
        return Err("the topic name is empty".to_owned());
    }
    if topic == "." || topic == ".." {
        return Err(format!("`{topic}` is not a valid topic name"));
    }
    if let Some(bad) = topic
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "the topic name contains {bad:?}; Kafka allows only ASCII letters, digits, '.', '_' \
             and '-'"
        ));
    }
    // All ASCII from here: bytes are characters.
    if topic.len() > MAX_TOPIC_LEN {
        return Err(format!(
            "the topic name is {} characters long; Kafka allows at most {MAX_TOPIC_LEN}",
            topic.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_topic_name;

    #[test]
    fn topic_names_follow_kafka_rules() {
        for ok in ["orders.kafka", "a", "A-b_c.9", &"x".repeat(249)] {
            assert_eq!(check_topic_name(ok), Ok(()), "{ok}");
        }
        let err = |t: &str| check_topic_name(t).expect_err(t);
        assert!(err("").contains("empty"));
        assert!(err(".").contains("not a valid"));
        assert!(err("..").contains("not a valid"));
        assert!(err(&"x".repeat(250)).contains("at most 249"));
        assert!(err("orders kafka").contains("' '"));
        assert!(err("ordérs").contains("'é'"));
        // A long non-ASCII name is reported for its characters, not a byte count.
        assert!(err(&"é".repeat(200)).contains("'é'"));
    }
}
