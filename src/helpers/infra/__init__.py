"""Infrastructure: the ports implemented for each backend (`local/`: files, SQLite,
subprocesses, Triton; `aws/`: S3, DynamoDB, SageMaker, Step Functions)."""
