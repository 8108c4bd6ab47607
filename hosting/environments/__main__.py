from hosting.environments.app import main

main()
