-- Runs once, on the first start of an empty data volume (docker-entrypoint-initdb.d), as
-- POSTGRES_USER: one database for the MLflow tracking/registry store, one for MLflow's
-- authentication (users, permissions; infra/mlflow-entrypoint.sh also creates it on a volume made
-- before authentication) and one for the Prefect server.
-- MLflow and Prefect create their own tables (migrations) on first start.
CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;
CREATE DATABASE prefect;
