"""AWS Lambda entry points: the API (`api_handler`) and the workflow's steps (`workflow`)."""
