# hpsearch worker/dashboard image (CUDA-enabled torch from PyPI on x86_64).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY search ./search
COPY trainers ./trainers
RUN pip install --no-cache-dir "torch==2.14.1" "torchvision==0.29.1" \
 && pip install --no-cache-dir ".[postgres,mysql,dashboard]"
COPY studies ./studies
ENV HPSEARCH_DATA=/data
CMD ["hpsearch", "--help"]
