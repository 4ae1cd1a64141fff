"""The sagemaker backend: S3, DynamoDB, SageMaker training jobs and endpoints."""
