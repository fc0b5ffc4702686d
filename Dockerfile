# jobmeter: build the release binary, then ship it on a slim base.
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends \
      build-essential pkg-config libclang-dev libssl-dev zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --bin jobmeter

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/jobmeter jobmeter \
    && mkdir -p /var/lib/jobmeter && chown jobmeter /var/lib/jobmeter
COPY --from=build /src/target/release/jobmeter /usr/local/bin/jobmeter
COPY config /etc/jobmeter
WORKDIR /etc/jobmeter/..
USER jobmeter
ENV JOBMETER__STATE__DIR=/var/lib/jobmeter/state \
    JOBMETER__BILLING__RATE_CARD=/etc/jobmeter/rate-card.toml \
    JOBMETER__BILLING__PLANS=/etc/jobmeter/plans.toml \
    JOBMETER__HTTP__LISTEN=0.0.0.0:9464
EXPOSE 9464
ENTRYPOINT ["jobmeter"]
CMD ["run"]
