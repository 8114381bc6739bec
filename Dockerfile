# hpsearch worker/dashboard image (CUDA-enabled torch from PyPI on x86_64).
#
#   docker build -t hpsearch .                               # PostgreSQL, MySQL, the dashboard
#   docker build --build-arg EXTRAS=s3,ray -t hpsearch .     # plus extras of pyproject.toml
#
# It runs as the user hpsearch (uid 1000), who owns the folders that compose and Kubernetes
# mount volumes on: a new named volume takes its folder's owner, so the workers can write there.
FROM python:3.11-slim
ARG EXTRAS=""
WORKDIR /app
COPY pyproject.toml README.md ./
COPY search ./search
COPY trainers ./trainers
RUN pip install --no-cache-dir "torch==2.14.1" "torchvision==0.29.1" \
 && pip install --no-cache-dir ".[postgres,mysql,dashboard${EXTRAS:+,$EXTRAS}]"
COPY studies ./studies
RUN groupadd --gid 1000 hpsearch \
 && useradd --uid 1000 --gid 1000 --create-home hpsearch \
 && mkdir -p /data /artifacts /app/checkpoints \
 && chown hpsearch:hpsearch /app /data /artifacts /app/checkpoints
ENV HPSEARCH_DATA=/data
# Numeric, so Kubernetes' runAsNonRoot can check it.
USER 1000:1000
CMD ["hpsearch", "--help"]
