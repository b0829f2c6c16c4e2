#!/usr/bin/env sh
# infogap's Kafka ACLs (stream/tools/acls.py): who may read and write which topic, for the topic prefix and
# consumer group of the environment (INFOGAP_TOPIC_PREFIX, INFOGAP_CONSUMER_GROUP).
#
#   deploy/kafka-acls.sh plan                      # the grants, nothing sent (--format kafka-acls: as
#                                                  # kafka-acls.sh commands of a Kafka distribution)
#   deploy/kafka-acls.sh apply                     # grant them, then check (exit 2 if anything is off)
#   deploy/kafka-acls.sh check                     # missing grants, or another principal may write
#                                                  # cooc / state.users / state.items / erasures
#
# Connect as the administrator (a super user, or ALTER + DESCRIBE on the cluster): INFOGAP_KAFKA_BOOTSTRAP,
# INFOGAP_KAFKA_SECURITY_PROTOCOL, INFOGAP_KAFKA_SASL_MECHANISM, INFOGAP_KAFKA_USERNAME, INFOGAP_KAFKA_PASSWORD
# (or the INFOGAP_KAFKA_SSL_* files). Principals per role: INFOGAP_ACL_WORKER, INFOGAP_ACL_PRODUCERS,
# INFOGAP_ACL_CATALOG, INFOGAP_ACL_PREFERENCES, INFOGAP_ACL_CHANNELS, INFOGAP_ACL_OPERATORS (comma-separated
# User:<name>), or --worker / --producers / ... ; see `deploy/kafka-acls.sh --help`.
# The broker must run an authorizer (KRaft: authorizer.class.name=
# org.apache.kafka.metadata.authorizer.StandardAuthorizer) with allow.everyone.if.no.acl.found=false.
set -eu
# Needs the package installed (deploy/install.sh, or pip install . in the repository).
exec "${PYTHON:-python3}" -m infogap.stream.tools.acls "$@"
