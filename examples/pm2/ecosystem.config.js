// A PM2 ecosystem file, as PM2 users write it. `herd start ecosystem.config.js`
// starts each app as its own cluster; `--env production` applies env_production.
// `jobs` serves no port: it runs in fork mode, as PM2 would run it.
module.exports = {
  apps: [
    {
      name: 'api',
      script: './app.js',
      instances: 2,
      exec_mode: 'cluster',
      max_memory_restart: '300M',
      kill_timeout: 3000,
      env: { PORT: 3000, GREETING: 'hello' },
      env_production: { NODE_ENV: 'production', GREETING: 'hello from production' },
    },
    {
      name: 'web',
      script: './app.js',
      instances: 'max',
      env: { PORT: 3001, GREETING: 'web' },
    },
    {
      // No port: a worker of the queue, run in fork mode.
      name: 'jobs',
      script: './jobs.js',
    },
  ],
};
