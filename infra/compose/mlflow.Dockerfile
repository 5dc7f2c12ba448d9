# The MLflow tracking server with what the scale-out stack needs: PostgreSQL and S3.
FROM python:3.11-slim
RUN pip install --no-cache-dir "mlflow>=3.1,<4" "psycopg[binary]>=3.2" "boto3>=1.34" \
    && useradd --system --uid 10001 mlflow
USER mlflow
