-- Runs once, on the first start of an empty data volume (docker-entrypoint-initdb.d), as
-- POSTGRES_USER: one database for the MLflow tracking/registry store and one for the Prefect server.
-- MLflow and Prefect create their own tables (migrations) on first start.
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
