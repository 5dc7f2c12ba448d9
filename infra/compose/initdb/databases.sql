-- One database per server, both owned by the compose stack's role.
CREATE DATABASE prefect OWNER modelyard;
CREATE DATABASE mlflow OWNER modelyard;
