//! The activity log and the name registry on PostgreSQL.
